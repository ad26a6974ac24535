//! `--scale`: many agents at once on one sink.
//!
//! One relay-sink process (the real binary) and, in this process, `--agents` agents made with
//! the agent's library ([`agent::run`]), each with its own UDP input socket, its own
//! certificate (identity `agent-0001` …) and its own QUIC connection. Each agent receives
//! `--scale-rate` datagrams a second of its own sFlow stream (agent address 10.0.x.y, one
//! sub-agent, sequence 1, 2, …) for `--scale-duration`; the receiver checks that every
//! (agent, sub-agent, sequence) arrived exactly once. Reported: agents connected (as the
//! sink's `/agents` lists them), sent, delivered, lost, duplicated; the sink's CPU per
//! datagram and CPU % over the run, its peak RSS, and RSS per connected agent ((peak RSS −
//! RSS before the agents came) / agents).

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agent::config::{Args, Sinks, TransportMode};
use relay_tests::sflow::SflowGen;
use relay_tests::{Pki, bin, http, metrics_addr, start_sink};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::load::{Key, Receiver};
use crate::procs::{self, mib};
use crate::report::thousands;

/// The issue's memory budget for the sink: this much, plus [`SINK_RSS_PER_AGENT`] per
/// connected agent.
const SINK_RSS_BASE: u64 = 64 << 20;
const SINK_RSS_PER_AGENT: u64 = 1 << 20;

/// Options of `--scale`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ScaleArgs {
    /// Run the scale mode instead of the path comparison: many agents on one sink.
    #[arg(long)]
    pub(crate) scale: bool,
    /// Agents connected at once (with --scale).
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// Datagrams per second sent to each agent (with --scale).
    #[arg(long, default_value_t = 20)]
    scale_rate: u64,
    /// How long each agent receives traffic (with --scale).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    scale_duration: Duration,
}

/// Runs the scale mode and reports.
pub(crate) fn run(args: &ScaleArgs, json_to: &Path) {
    // Build (or find) the release binaries before timing anything.
    let _ = bin("relay-sink");
    let started = Instant::now();
    let n = args.agents.max(1);
    let nofile = raise_nofile();
    eprintln!(
        "relay-perf --scale: {n} agents, {}/s each for {:?}; open files limit {nofile:?}",
        args.scale_rate, args.scale_duration
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path());
    let sink_cert = pki.sink_cert("sink");
    let issuing = Instant::now();
    let certs = issue_agents(&pki, n);
    let issue_seconds = issuing.elapsed().as_secs_f64();
    eprintln!("  {n} agent certificates issued (relay-certs) in {issue_seconds:.1} s");

    let rx = Receiver::start();
    rx.record();
    let (sink, sink_addr) = start_sink(
        &pki,
        &sink_cert,
        &[rx.addr()],
        None,
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let sink_metrics = metrics_addr(&sink);
    let sink_pid = sink.pid().to_string();
    std::thread::sleep(Duration::from_millis(500));
    let sink_before = procs::usage(&sink_pid);
    let self_before = procs::usage("self");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let stop = CancellationToken::new();
    let mut inputs: Vec<SocketAddr> = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    let agents_started = Instant::now();
    for (cert, key) in &certs {
        let config = agent::Config::try_from(Args {
            listen: vec!["127.0.0.1:0".parse().expect("address")],
            sink: Some(Sinks::One(sink_addr.to_string())),
            server_name: Some("localhost".into()),
            ca: Some(pki.ca()),
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            transport: Some(TransportMode::Quic),
            reconnect_max: Some(Duration::from_secs(2)),
            ..Default::default()
        })
        .expect("agent config");
        let sockets = agent::bind_listeners(&config).expect("agent input socket");
        inputs.push(sockets[0].local_addr().expect("agent input address"));
        let stop = stop.clone();
        tasks.push(rt.spawn(async move {
            let mut links = Vec::new();
            agent::run(
                config,
                sockets,
                Arc::new(agent::Metrics::default()),
                &mut links,
                stop.cancelled_owned(),
            )
            .await
        }));
    }
    eprintln!(
        "  {n} agents started in {:.1} s; sending",
        agents_started.elapsed().as_secs_f64()
    );

    // The traffic, on a thread: agent i gets datagram k when k % n == i, evenly spread.
    let sending = Arc::new(AtomicBool::new(true));
    let sender = {
        let (inputs, rate, length, sending) = (
            inputs.clone(),
            args.scale_rate,
            args.scale_duration,
            sending.clone(),
        );
        std::thread::spawn(move || {
            let sent = send_round_robin(&inputs, rate, length);
            sending.store(false, Ordering::Relaxed);
            sent
        })
    };
    let mut all_listed_after = None;
    let mut most_listed = 0usize;
    let mut last_progress = Instant::now();
    while sending.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        let listed = listed_agents(sink_metrics);
        most_listed = most_listed.max(listed.unwrap_or(0));
        if all_listed_after.is_none() && listed == Some(n) {
            all_listed_after = Some(agents_started.elapsed().as_secs_f64());
        }
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            eprintln!(
                "  {:>4.0} s: the sink lists {} agents; {} datagrams delivered",
                agents_started.elapsed().as_secs_f64(),
                listed.map_or("?".into(), |l| l.to_string()),
                thousands(rx.count())
            );
        }
    }
    let sent_per_agent: Vec<u64> = sender.join().expect("sender thread");
    let sent: u64 = sent_per_agent.iter().sum();
    let delivered = rx.settle(sent, Duration::from_secs(3), Duration::from_secs(60));
    let wall = agents_started.elapsed().as_secs_f64();
    let sink_after = procs::usage(&sink_pid);
    let self_after = procs::usage("self");
    let listed_at_end = listed_agents(sink_metrics);
    most_listed = most_listed.max(listed_at_end.unwrap_or(0));
    if all_listed_after.is_none() && listed_at_end == Some(n) {
        all_listed_after = Some(wall);
    }

    // Exactly once: every (agent, sub-agent 0, sequence 1..=sent) and nothing else.
    let arrivals = rx.take();
    let mut seen: HashSet<Key> = HashSet::with_capacity(arrivals.len());
    let mut duplicated = 0u64;
    let mut unexpected = 0u64;
    for (key, _) in &arrivals {
        let i = u32::from(key.0).wrapping_sub(u32::from(agent_address(0))) as usize;
        let expected = i < n && key.1 == 0 && key.2 >= 1 && u64::from(key.2) <= sent_per_agent[i];
        if !expected {
            unexpected += 1;
        } else if !seen.insert(*key) {
            duplicated += 1;
        }
    }
    let missing = sent - seen.len() as u64;

    stop.cancel();
    let errors: Vec<String> = rt.block_on(async {
        let mut errors = Vec::new();
        for task in tasks {
            match tokio::time::timeout(Duration::from_secs(30), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => errors.push(e.to_string()),
                Ok(Err(e)) => errors.push(format!("agent task: {e}")),
                Err(_) => errors.push("agent did not stop within 30 s".into()),
            }
        }
        errors
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    drop(sink);

    let sink_cpu = sink_after.cpu_seconds - sink_before.cpu_seconds;
    let agents_cpu = self_after.cpu_seconds - self_before.cpu_seconds;
    let connected = most_listed as u64;
    let per_agent = sink_after
        .peak_rss
        .saturating_sub(sink_before.rss)
        .checked_div(connected);
    let budget = SINK_RSS_BASE + SINK_RSS_PER_AGENT * connected;
    let total_wall = started.elapsed().as_secs_f64();

    println!("\n## relay-perf --scale: {n} agents on one sink\n");
    let machine = procs::machine(8 << 20);
    println!(
        "- machine: {} cores, {}, kernel {}",
        machine["cores"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?")
    );
    println!(
        "- {n} agents (the agent's library, in the benchmark process, each with its own certificate, UDP input and QUIC connection), {}/s of realistic sFlow each for {:?}; one relay-sink process replaying unpaced to one receiver",
        args.scale_rate, args.scale_duration
    );
    println!(
        "- run: {:.0} s in all (certificates {issue_seconds:.0} s, agents and traffic {wall:.0} s)\n",
        total_wall
    );
    println!("| measure | value |\n|---|---|");
    println!(
        "| agents connected (listed by the sink's /agents) | {most_listed} of {n}{} |",
        all_listed_after.map_or(String::new(), |s| format!(", all within {s:.1} s"))
    );
    println!("| datagrams sent | {} |", thousands(sent));
    println!(
        "| delivered (each (agent, sub-agent, sequence) once) | {} |",
        thousands(seen.len() as u64)
    );
    println!("| lost | {} |", thousands(missing));
    println!(
        "| duplicated / unexpected | {} / {} |",
        thousands(duplicated),
        thousands(unexpected)
    );
    println!(
        "| sink CPU per datagram (the {n} handshakes included) | {:.1} µs |",
        sink_cpu * 1e6 / delivered.max(1) as f64
    );
    println!(
        "| sink CPU over the run | {:.1} % of one core |",
        sink_cpu / wall * 100.0
    );
    println!(
        "| sink RSS before the agents / peak | {} / {} MiB |",
        mib(sink_before.rss),
        mib(sink_after.peak_rss)
    );
    println!(
        "| sink RSS per connected agent | {} |",
        per_agent.map_or("–".into(), |b| format!("{:.1} KiB", b as f64 / 1024.0))
    );
    println!(
        "| agents' process (this one: {n} agents, generator, receiver) CPU / peak RSS | {:.1} % of one core / {} MiB |",
        agents_cpu / wall * 100.0,
        mib(self_after.peak_rss)
    );
    println!(
        "\nIssue 7 acceptance, this run:\n- all delivered: {}\n- sink RSS ≤ 64 MiB + 1 MiB per connected agent ({} MiB): {} (peak {} MiB)",
        if missing == 0 && duplicated == 0 && most_listed == n {
            "pass"
        } else {
            "FAIL"
        },
        mib(budget),
        if sink_after.peak_rss <= budget {
            "pass"
        } else {
            "FAIL"
        },
        mib(sink_after.peak_rss)
    );
    if !errors.is_empty() {
        println!(
            "\n{} agents ended with an error; the first: {}",
            errors.len(),
            errors[0]
        );
    }

    crate::write_json(
        json_to,
        &json!({
            "machine": machine,
            "settings": {
                "agents": n,
                "rate_per_agent": args.scale_rate,
                "duration_seconds": args.scale_duration.as_secs_f64(),
            },
            "open_files_limit": nofile,
            "certificates_seconds": issue_seconds,
            "wall_seconds": total_wall,
            "agents_connected": most_listed,
            "agents_connected_at_end": listed_at_end,
            "all_connected_after_seconds": all_listed_after,
            "sent": sent,
            "received": delivered,
            "delivered_once": seen.len(),
            "lost": missing,
            "duplicated": duplicated,
            "unexpected": unexpected,
            "sink": {
                "cpu_seconds": sink_cpu,
                "cpu_us_per_datagram": sink_cpu * 1e6 / delivered.max(1) as f64,
                "cpu_percent": sink_cpu / wall * 100.0,
                "rss_bytes_before_agents": sink_before.rss,
                "peak_rss_bytes": sink_after.peak_rss,
                "rss_bytes_per_agent": per_agent,
                "rss_budget_bytes": budget,
            },
            "agents_process": {
                "cpu_percent": agents_cpu / wall * 100.0,
                "peak_rss_bytes": self_after.peak_rss,
            },
            "agent_errors": errors,
        }),
    );
}

/// The sFlow agent address of agent `i`: 10.0.0.1, 10.0.0.2, …
fn agent_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0A00_0001u32 + i as u32)
}

/// Issues `n` agent certificates (`agent-0001` …) with `relay-certs`, four at a time.
fn issue_agents(pki: &Pki, n: usize) -> Vec<(std::path::PathBuf, std::path::PathBuf)> {
    const THREADS: usize = 4;
    let mut certs = vec![Default::default(); n];
    std::thread::scope(|s| {
        for (t, chunk) in certs.chunks_mut(n.div_ceil(THREADS)).enumerate() {
            let base = t * n.div_ceil(THREADS);
            s.spawn(move || {
                for (j, slot) in chunk.iter_mut().enumerate() {
                    *slot = pki.agent_cert(&format!("agent-{:04}", base + j + 1));
                }
            });
        }
    });
    certs
}

/// Sends `rate` datagrams a second to each of `inputs` for `length`, round robin, evenly
/// spread; each input gets its own sFlow agent's stream. Returns how many each got.
fn send_round_robin(inputs: &[SocketAddr], rate: u64, length: Duration) -> Vec<u64> {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind generator");
    let _ = socket2::SockRef::from(&socket).set_send_buffer_size(4 << 20);
    let mut sflow: Vec<SflowGen> = (0..inputs.len())
        .map(|i| SflowGen::for_agent(agent_address(i), 1, i as u64 + 1))
        .collect();
    let mut sent = vec![0u64; inputs.len()];
    let per_second = (rate * inputs.len() as u64) as f64;
    let total = (per_second * length.as_secs_f64()) as u64;
    let start = Instant::now();
    for k in 0..total {
        let due = Duration::from_secs_f64(k as f64 / per_second);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let i = (k % inputs.len() as u64) as usize;
        let datagram = sflow[i].datagram();
        loop {
            match socket.send_to(&datagram, inputs[i]) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => std::thread::sleep(Duration::from_micros(100)),
            }
        }
        sent[i] += 1;
    }
    sent
}

/// How many distinct agents (certificate names) the sink's `/agents` lists as connected, if it
/// answers.
fn listed_agents(metrics: SocketAddr) -> Option<usize> {
    let page = http::get_json(metrics, "/agents").ok()?;
    let names: HashSet<&str> = page
        .as_array()?
        .iter()
        .filter_map(|c| c.get("agent")?.as_str())
        .collect();
    Some(names.len())
}

/// Raises the soft limit of open files to the hard one (each agent holds a few sockets);
/// returns (soft, hard) after.
fn raise_nofile() -> Option<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    getrlimit(Resource::RLIMIT_NOFILE).ok()
}
