//! `--scale N`: N agents at once on one sink, against one agent at the same total rate.
//!
//! Two phases, each with a fresh relay-sink process (the real binary) replaying unpaced to one
//! receiver:
//! - **N agents**, made with the agent's library ([`agent::run`]) in worker processes
//!   (`relay-perf agents`, up to [`AGENTS_PER_WORKER`] each: a process may be held to 20,000
//!   open files), each agent with its own UDP input socket, its own certificate (identity
//!   `agent-0001` …) and its own QUIC connection (gRPC with `--scale-transport grpc`). A
//!   worker's agents share its runtime's threads (their receive loops are tasks,
//!   [`agent::config::ReceiveOn::Runtime`]), so 10,000 fit on this machine. Each agent receives
//!   `--scale-rate` datagrams a second of its own sFlow stream (agent address 10.0.x.y, one
//!   sub-agent, sequence 1, 2, …) for `--scale-duration`.
//! - **One agent** receiving N × `--scale-rate` datagrams a second for as long, on a receive
//!   thread as the binary does: the baseline the issue compares the sink's CPU per datagram
//!   with.
//!
//! In each phase the traffic starts once the sink's `/agents` lists every agent (or after a
//! time limit), and the receiver checks that every (agent, sub-agent, sequence) arrived exactly
//! once. Reported: agents connected, sent, delivered, lost, duplicated; the sink's CPU per
//! datagram while relaying (from the moment the traffic starts until it has all arrived) and
//! over the whole phase (the handshakes included); its peak RSS, and RSS per connected agent
//! ((peak RSS − RSS before the agents came) / agents); and the datagrams per batch the sink
//! received, which grow past one a batch when the agents' processes cannot keep up (they
//! share this machine's cores with the sink unless `--scale-own-core` gives the sink one of
//! its own).
//!
//! Issue 20 asks, at 10,000 agents: all delivered exactly once, CPU per datagram at most 2×
//! the one agent's, peak RSS at most 64 MiB + 64 KiB per connected agent.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agent::config::{Args, ReceiveOn, Sinks, TransportMode};
use relay_tests::sflow::SflowGen;
use relay_tests::{Pki, bin, http, metrics_addr, start_sink};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::load::{Key, Receiver};
use crate::procs::{self, Usage, mib};
use crate::report::thousands;

/// The issue's memory budget for the sink: this much, plus [`SINK_RSS_PER_AGENT`] per
/// connected agent.
const SINK_RSS_BASE: u64 = 64 << 20;
const SINK_RSS_PER_AGENT: u64 = 64 << 10;

/// The issue's bound on the sink's CPU per datagram with many agents, against one agent at the
/// same total rate.
const CPU_RATIO_BOUND: f64 = 2.0;

/// Options of `--scale`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ScaleArgs {
    /// Run the scale mode instead of the path comparison, with this many agents on one sink
    /// (1,000 when no number follows).
    #[arg(long, value_name = "AGENTS", num_args = 0..=1, default_missing_value = "1000")]
    pub(crate) scale: Option<usize>,
    /// The number of agents, as `--scale N` gives it (kept for older command lines).
    #[arg(long, hide = true)]
    agents: Option<usize>,
    /// Datagrams per second sent to each agent (with --scale; 0: connected and idle).
    #[arg(long, default_value_t = 20)]
    scale_rate: u64,
    /// How long each phase sends (with --scale).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    scale_duration: Duration,
    /// Give the sink a core of its own, and the agents, the sender and the receiver the others
    /// (with --scale), as if the sink had a machine of its own: sharing cores, the sink's CPU
    /// time grows with its load's preemptions. The load then has a core less: when it cannot
    /// keep up, the agents' batches grow (the report shows their size).
    #[arg(long)]
    scale_own_core: bool,
    /// How the agents reach the sink (with --scale): `quic`, or `grpc` (HTTP/2 over TLS on
    /// TCP, as at sites that let no UDP out).
    #[arg(long, value_enum, default_value_t = TransportMode::Quic)]
    scale_transport: TransportMode,
}

/// What every phase of a run shares.
struct Setup<'a> {
    /// relay-perf itself, for the workers.
    this: &'a Path,
    pki: &'a Pki,
    sink_cert: &'a (PathBuf, PathBuf),
    cores: Option<&'a procs::Cores>,
    transport: TransportMode,
}

/// What one phase measured.
#[derive(Debug, Default)]
struct Phase {
    agents: usize,
    rate_per_agent: u64,
    /// The most agents the sink's /agents listed at once.
    connected: usize,
    /// Connections the sink accepted over the phase (`relay_sink_connections_accepted_total`):
    /// more than the agents when some reconnected.
    accepted: u64,
    all_connected_after: Option<f64>,
    sent: u64,
    received: u64,
    delivered_once: u64,
    lost: u64,
    /// Arrived only once the agents were stopped (they send what they hold at shutdown).
    late: u64,
    /// Batches and datagrams the sink received (`relay_sink_{batches,datagrams}_received_total`).
    batches_at_sink: u64,
    datagrams_at_sink: u64,
    /// The sink's threads' wake-ups (voluntary context switches) while relaying.
    sink_wakeups: u64,
    /// Connections that ended during the phase, by the reason the sink logged.
    disconnections: std::collections::BTreeMap<String, u64>,
    duplicated: u64,
    unexpected: u64,
    /// Seconds from the first agent's start to the traffic's start.
    connect_seconds: f64,
    /// Seconds from the traffic's start until it had all arrived (or stopped arriving).
    relay_seconds: f64,
    sink_before: Usage,
    sink_at_traffic: Usage,
    sink_after: Usage,
    agents_cpu_seconds: f64,
    agents_peak_rss: u64,
    errors: Vec<String>,
}

impl Phase {
    /// The sink's CPU per datagram delivered while relaying, µs.
    fn cpu_us_relaying(&self) -> f64 {
        (self.sink_after.cpu_seconds - self.sink_at_traffic.cpu_seconds) * 1e6
            / self.received.max(1) as f64
    }

    /// The sink's CPU while relaying, % of one core.
    fn cpu_percent_relaying(&self) -> f64 {
        (self.sink_after.cpu_seconds - self.sink_at_traffic.cpu_seconds)
            / self.relay_seconds.max(1e-9)
            * 100.0
    }

    /// The same over the whole phase, the handshakes included, µs.
    fn cpu_us_all(&self) -> f64 {
        (self.sink_after.cpu_seconds - self.sink_before.cpu_seconds) * 1e6
            / self.received.max(1) as f64
    }

    /// (Peak RSS − RSS before the agents) / connected agents, bytes.
    fn rss_per_agent(&self) -> Option<u64> {
        self.sink_after
            .peak_rss
            .saturating_sub(self.sink_before.rss)
            .checked_div(self.connected as u64)
    }

    /// The sink's wake-ups per batch it received, while relaying.
    fn wakeups_per_batch(&self) -> f64 {
        self.sink_wakeups as f64 / self.batches_at_sink.max(1) as f64
    }

    /// Datagrams per batch the sink received.
    fn batch_size(&self) -> f64 {
        self.datagrams_at_sink as f64 / self.batches_at_sink.max(1) as f64
    }

    fn budget(&self) -> u64 {
        SINK_RSS_BASE + SINK_RSS_PER_AGENT * self.connected as u64
    }

    fn exactly_once(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && self.connected == self.agents
            && self.errors.is_empty()
    }

    fn json(&self) -> Value {
        json!({
            "agents": self.agents,
            "rate_per_agent": self.rate_per_agent,
            "agents_connected": self.connected,
            "connections_accepted": self.accepted,
            "all_connected_after_seconds": self.all_connected_after,
            "connect_seconds": self.connect_seconds,
            "relay_seconds": self.relay_seconds,
            "sent": self.sent,
            "received": self.received,
            "delivered_once": self.delivered_once,
            "lost": self.lost,
            "delivered_late": self.late,
            "sink_batches_received": self.batches_at_sink,
            "sink_datagrams_received": self.datagrams_at_sink,
            "sink_wakeups_relaying": self.sink_wakeups,
            "disconnections": self.disconnections,
            "duplicated": self.duplicated,
            "unexpected": self.unexpected,
            "sink": {
                "cpu_us_per_datagram_relaying": self.cpu_us_relaying(),
                "cpu_us_per_datagram_all": self.cpu_us_all(),
                "cpu_percent_relaying": self.cpu_percent_relaying(),
                "rss_bytes_before_agents": self.sink_before.rss,
                "peak_rss_bytes": self.sink_after.peak_rss,
                "rss_bytes_per_agent": self.rss_per_agent(),
                "rss_budget_bytes": self.budget(),
            },
            "agents_process": {
                "cpu_seconds": self.agents_cpu_seconds,
                "peak_rss_bytes": self.agents_peak_rss,
            },
            "agent_errors": self.errors,
        })
    }
}

/// Runs the scale mode and reports.
pub(crate) fn run(args: &ScaleArgs, json_to: &Path) {
    // This program, for the workers; read first: the build below may replace its file.
    let this = std::env::current_exe().expect("relay-perf's path");
    // Build (or find) the release binaries before timing anything.
    let _ = bin("relay-sink");
    let started = Instant::now();
    let n = args.agents.or(args.scale).unwrap_or(1_000).max(1);
    let nofile = raise_nofile();
    // Read before the load is put on its cores (the count follows this thread's).
    let machine = procs::machine(8 << 20);
    let cores = args.scale_own_core.then(|| {
        let cores = procs::Cores::split().expect("--scale-own-core needs two cores or more");
        cores
            .load_here()
            .expect("the load's threads and processes on their cores");
        cores
    });
    eprintln!(
        "relay-perf --scale {n}: {}/s each for {:?}, then one agent at {}/s; open files limit {nofile:?}",
        args.scale_rate,
        args.scale_duration,
        args.scale_rate * n as u64
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path());
    let sink_cert = pki.sink_cert("sink");
    let issuing = Instant::now();
    let certs = issue_agents(&pki, n);
    let issue_seconds = issuing.elapsed().as_secs_f64();
    eprintln!("  {n} agent certificates issued (relay-certs) in {issue_seconds:.1} s");

    let setup = Setup {
        this: &this,
        pki: &pki,
        sink_cert: &sink_cert,
        cores: cores.as_ref(),
        transport: args.scale_transport,
    };
    eprintln!("phase 1: {n} agents");
    let many = phase(&setup, &certs, args.scale_rate, args.scale_duration);
    eprintln!("phase 2: one agent at the same total rate");
    let one = phase(
        &setup,
        &certs[..1],
        args.scale_rate * n as u64,
        args.scale_duration,
    );
    let total_wall = started.elapsed().as_secs_f64();
    let ratio = many.cpu_us_relaying() / one.cpu_us_relaying().max(1e-9);

    println!(
        "\n## relay-perf --scale {n}: {n} agents on one sink, and one agent at the same total rate\n"
    );
    println!(
        "- machine: {} cores, {}, kernel {}",
        machine["cores"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?")
    );
    println!(
        "- {n} agents (the agent's library, in worker processes of up to {AGENTS_PER_WORKER} agents that share their runtime's threads; each agent with its own certificate, UDP input and {} connection), {}/s of realistic sFlow each for {:?}; then one agent at {}/s for as long. Each phase with a fresh relay-sink process (defaults) replaying unpaced to one receiver",
        args.scale_transport.as_str(),
        args.scale_rate,
        args.scale_duration,
        args.scale_rate * n as u64,
    );
    match &cores {
        Some(cores) => println!(
            "- cores (`--scale-own-core`): the sink on core {} alone; the agents, the sender and the receiver on {:?}",
            cores.measured_core, cores.load_cores
        ),
        None => println!(
            "- cores: the sink shares every core with the agents, the sender and the receiver"
        ),
    }
    println!("- run: {total_wall:.0} s in all (certificates {issue_seconds:.0} s)\n");
    println!("| measure | {n} agents | 1 agent |\n|---|---|---|");
    let row = |name: &str, f: &dyn Fn(&Phase) -> String| {
        println!("| {name} | {} | {} |", f(&many), f(&one));
    };
    row("rate per agent", &|p| {
        format!("{}/s", thousands(p.rate_per_agent))
    });
    row("agents connected (listed by the sink's /agents)", &|p| {
        format!(
            "{} of {}{}",
            p.connected,
            p.agents,
            p.all_connected_after
                .map_or(String::new(), |s| format!(", all within {s:.1} s"))
        )
    });
    row(
        "connections the sink accepted (reconnections included)",
        &|p| thousands(p.accepted),
    );
    row("datagrams sent", &|p| thousands(p.sent));
    row("delivered (each (agent, sub-agent, sequence) once)", &|p| {
        thousands(p.delivered_once)
    });
    row("lost / duplicated / unexpected", &|p| {
        format!(
            "{} / {} / {}",
            thousands(p.lost),
            thousands(p.duplicated),
            thousands(p.unexpected)
        )
    });
    row("datagrams per batch the sink received", &|p| {
        format!("{:.2}", p.batch_size())
    });
    row(
        "sink wake-ups per batch (its threads' voluntary context switches)",
        &|p| format!("{:.2}", p.wakeups_per_batch()),
    );
    row("delivered only at the agents' shutdown (late)", &|p| {
        thousands(p.late)
    });
    row("connections ended during the run, by reason", &|p| {
        if p.disconnections.is_empty() {
            "none".into()
        } else {
            p.disconnections
                .iter()
                .map(|(reason, n)| format!("{n}: {reason}"))
                .collect::<Vec<_>>()
                .join("; ")
        }
    });
    row("sink CPU per datagram, relaying", &|p| {
        format!("{:.1} µs", p.cpu_us_relaying())
    });
    row("sink CPU per datagram, the handshakes included", &|p| {
        format!("{:.1} µs", p.cpu_us_all())
    });
    row("sink CPU while relaying", &|p| {
        format!("{:.1} % of one core", p.cpu_percent_relaying())
    });
    row("sink RSS before the agents / peak", &|p| {
        format!(
            "{} / {} MiB",
            mib(p.sink_before.rss),
            mib(p.sink_after.peak_rss)
        )
    });
    row("sink RSS per connected agent", &|p| {
        p.rss_per_agent()
            .map_or("–".into(), |b| format!("{:.1} KiB", b as f64 / 1024.0))
    });
    row("agents' worker processes, summed: CPU / peak RSS", &|p| {
        format!(
            "{:.0} s / {} MiB",
            p.agents_cpu_seconds,
            mib(p.agents_peak_rss)
        )
    });
    let verdict = |ok: bool| if ok { "pass" } else { "FAIL" };
    println!(
        "\nIssue 20, line 3, this run:\n- all delivered exactly once: {}\n- sink CPU per datagram, relaying: {:.1} µs against {:.1} µs for one agent, {ratio:.2}× (at most {CPU_RATIO_BOUND}×): {}\n- sink peak RSS {} MiB, at most 64 MiB + 64 KiB per connected agent ({} MiB): {}",
        verdict(many.exactly_once() && one.exactly_once()),
        many.cpu_us_relaying(),
        one.cpu_us_relaying(),
        verdict(ratio <= CPU_RATIO_BOUND),
        mib(many.sink_after.peak_rss),
        mib(many.budget()),
        verdict(many.sink_after.peak_rss <= many.budget()),
    );
    for p in [&many, &one] {
        if !p.errors.is_empty() {
            println!(
                "\n{} agents ended with an error; the first: {}",
                p.errors.len(),
                p.errors[0]
            );
        }
    }

    crate::write_json(
        json_to,
        &json!({
            "machine": machine,
            "settings": {
                "agents": n,
                "rate_per_agent": args.scale_rate,
                "duration_seconds": args.scale_duration.as_secs_f64(),
                "transport": args.scale_transport.as_str(),
                "sink_core": cores.as_ref().map(|c| c.measured_core),
                "load_cores": cores.as_ref().map(|c| c.load_cores.clone()),
            },
            "open_files_limit": nofile,
            "certificates_seconds": issue_seconds,
            "wall_seconds": total_wall,
            "agents": many.json(),
            "one_agent": one.json(),
            "cpu_ratio_relaying": ratio,
        }),
    );
}

/// Starts a sink and `certs.len()` agents, waits until the sink lists them all, sends each
/// `rate` datagrams a second for `length`, waits for them, checks them and stops everything.
fn phase(setup: &Setup<'_>, certs: &[(PathBuf, PathBuf)], rate: u64, length: Duration) -> Phase {
    let Setup {
        this,
        pki,
        sink_cert,
        cores,
        transport,
    } = *setup;
    let n = certs.len();
    let mut p = Phase {
        agents: n,
        rate_per_agent: rate,
        ..Phase::default()
    };
    let rx = Receiver::start();
    rx.record();
    let (sink, sink_addr) = start_sink(
        pki,
        sink_cert,
        &[rx.addr()],
        None,
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let sink_metrics = metrics_addr(&sink);
    if let Some(cores) = cores {
        cores.measure(sink.pid()).expect("the sink on its core");
    }
    let sink_pid = sink.pid().to_string();
    std::thread::sleep(Duration::from_millis(500));
    p.sink_before = procs::usage(&sink_pid);

    let agents_started = Instant::now();
    let mut workers = Vec::new();
    let mut inputs: Vec<SocketAddr> = Vec::with_capacity(n);
    for chunk in certs.chunks(AGENTS_PER_WORKER) {
        let (worker, its_inputs) = Worker::start(this, pki, sink_addr, transport, chunk);
        workers.push(worker);
        inputs.extend(its_inputs);
    }
    assert_eq!(inputs.len(), n, "every agent's input address");
    eprintln!(
        "  {n} agents started in {:.1} s; waiting for the sink to list them all",
        agents_started.elapsed().as_secs_f64()
    );
    let connect_limit = Duration::from_secs(30) + Duration::from_millis(20) * n as u32;
    let mut last_progress = Instant::now();
    while agents_started.elapsed() < connect_limit {
        let listed = listed_agents(sink_metrics);
        p.connected = p.connected.max(listed.unwrap_or(0));
        if listed == Some(n) {
            p.all_connected_after = Some(agents_started.elapsed().as_secs_f64());
            break;
        }
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            eprintln!(
                "  {:>4.0} s: the sink lists {} agents",
                agents_started.elapsed().as_secs_f64(),
                listed.map_or("?".into(), |l| l.to_string()),
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    p.connect_seconds = agents_started.elapsed().as_secs_f64();
    p.sink_at_traffic = procs::usage(&sink_pid);
    let wakeups_at_traffic = procs::wakeups(&sink_pid);
    eprintln!(
        "  {} of {n} listed after {:.1} s; sending {}/s to each for {length:?}",
        p.connected, p.connect_seconds, rate
    );

    // The traffic, on a thread: agent i gets datagram k when k % n == i, evenly spread.
    let traffic_started = Instant::now();
    let sending = Arc::new(AtomicBool::new(true));
    let sender = {
        let (inputs, sending) = (inputs.clone(), sending.clone());
        std::thread::spawn(move || {
            let sent = send_round_robin(&inputs, rate, length);
            sending.store(false, Ordering::Relaxed);
            sent
        })
    };
    // Progress every 10 s (the agent list is not fetched more often: it costs the sink).
    let mut last_progress = Instant::now();
    while sending.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            let listed = listed_agents(sink_metrics);
            p.connected = p.connected.max(listed.unwrap_or(0));
            eprintln!(
                "  {:>4.0} s: the sink lists {} agents; {} datagrams delivered",
                traffic_started.elapsed().as_secs_f64(),
                listed.map_or("?".into(), |l| l.to_string()),
                thousands(rx.count())
            );
        }
    }
    let sent_per_agent: Vec<u64> = sender.join().expect("sender thread");
    p.sent = sent_per_agent.iter().sum();
    // Quiet for 10 s: an agent that reconnects under this load may take a few seconds.
    p.received = rx.settle(p.sent, Duration::from_secs(10), Duration::from_secs(120));
    p.relay_seconds = traffic_started.elapsed().as_secs_f64();
    p.sink_after = procs::usage(&sink_pid);
    p.sink_wakeups = procs::wakeups(&sink_pid).saturating_sub(wakeups_at_traffic);
    for w in &workers {
        let usage = procs::usage(&w.child.id().to_string());
        p.agents_cpu_seconds += usage.cpu_seconds;
        p.agents_peak_rss += usage.peak_rss;
    }
    let listed_at_end = listed_agents(sink_metrics);
    p.connected = p.connected.max(listed_at_end.unwrap_or(0));
    let scrape = relay_tests::metrics::Scrape::of(sink_metrics);
    p.accepted = scrape.sum("relay_sink_connections_accepted_total") as u64;
    p.batches_at_sink = scrape.sum("relay_sink_batches_received_total") as u64;
    p.datagrams_at_sink = scrape.sum("relay_sink_datagrams_received_total") as u64;

    // Why connections ended during the phase, from the sink's log.
    for event in sink.events() {
        if event["message"] == "agent disconnected" {
            let reason = relay_tests::field(&event, "reason").to_owned();
            *p.disconnections.entry(reason).or_default() += 1;
        }
    }

    // Stopped, the agents send what they still hold (within their shutdown grace); what
    // arrives then counts as delivered late.
    p.errors = workers.into_iter().flat_map(Worker::stop).collect();
    let on_time = rx.count();
    rx.settle(p.sent, Duration::from_secs(2), Duration::from_secs(10));

    // Exactly once: every (agent, sub-agent 0, sequence 1..=sent) and nothing else.
    let arrivals = rx.take();
    p.late = arrivals.len().saturating_sub(on_time as usize) as u64;
    let mut seen: HashSet<Key> = HashSet::with_capacity(arrivals.len());
    for (key, _) in &arrivals {
        let i = u32::from(key.0).wrapping_sub(u32::from(agent_address(0))) as usize;
        let expected = i < n && key.1 == 0 && key.2 >= 1 && u64::from(key.2) <= sent_per_agent[i];
        if !expected {
            p.unexpected += 1;
        } else if !seen.insert(*key) {
            p.duplicated += 1;
        }
    }
    p.delivered_once = seen.len() as u64;
    p.lost = p.sent - p.delivered_once;
    drop(sink);
    eprintln!(
        "  delivered {} of {}; sink CPU {:.1} µs per datagram while relaying",
        thousands(p.delivered_once),
        thousands(p.sent),
        p.cpu_us_relaying()
    );
    p
}

/// Agents per worker process: each agent holds two sockets (its input and its QUIC
/// endpoint's), and a process may have to live with 20,000 open files.
const AGENTS_PER_WORKER: usize = 5_000;

/// `relay-perf agents` (hidden): runs agents for `--scale`, in a process of its own.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WorkerArgs {
    /// The sink's address (QUIC and gRPC share it).
    #[arg(long)]
    sink: SocketAddr,
    /// How the agents reach the sink.
    #[arg(long, value_enum)]
    transport: TransportMode,
    /// The CA certificate.
    #[arg(long)]
    ca: PathBuf,
    /// A file with one agent a line: its certificate and key paths, separated by a tab.
    #[arg(long)]
    certs: PathBuf,
    /// Receive on a thread per agent, as the binary does, instead of tasks on the runtime.
    #[arg(long)]
    receive_threads: bool,
}

/// Runs the agents in `args.certs`, each with its own input socket and QUIC connection, all
/// on one runtime (their receive loops are tasks); prints `input ADDR` for each, in order,
/// then `ready`; stops them when a line or the end of standard input comes, prints `error
/// TEXT` for each that ended with one, and exits.
pub(crate) fn worker(args: &WorkerArgs) {
    use std::io::{BufRead, Write};
    raise_nofile();
    let certs = std::fs::read_to_string(&args.certs).expect("certificate list");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut out = std::io::stdout().lock();
    for line in certs.lines() {
        let (cert, key) = line.split_once('\t').expect("certificate and key");
        let mut config = agent::Config::try_from(Args {
            listen: vec!["127.0.0.1:0".parse().expect("address")],
            sink: Some(Sinks::One(args.sink.to_string())),
            server_name: Some("localhost".into()),
            ca: Some(args.ca.clone()),
            cert: Some(cert.into()),
            key: Some(key.into()),
            transport: Some(args.transport),
            reconnect_max: Some(Duration::from_secs(2)),
            ..Default::default()
        })
        .expect("agent config");
        if !args.receive_threads {
            config.receive_on = ReceiveOn::Runtime;
        }
        // The runtime's context, for the receive tasks' sockets.
        let _entered = rt.enter();
        let sockets = agent::bind_listeners(&config).expect("agent input socket");
        let input = sockets[0].local_addr().expect("agent input address");
        writeln!(out, "input {input}").expect("stdout");
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
    writeln!(out, "ready").expect("stdout");
    out.flush().expect("stdout");
    let _ = std::io::stdin().lock().lines().next();
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
    for error in errors {
        writeln!(out, "error {}", error.replace('\n', " ")).expect("stdout");
    }
    out.flush().expect("stdout");
    rt.shutdown_timeout(Duration::from_secs(5));
}

/// A `relay-perf agents` process.
struct Worker {
    child: std::process::Child,
    /// Its output, after `ready`.
    output: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    /// The file listing its agents, kept until it ends.
    _list: tempfile::NamedTempFile,
}

impl Worker {
    /// Starts a worker with `certs`' agents, connecting to `sink`; returns once they all run,
    /// with their input addresses in order. `this` is relay-perf itself. A worker with one
    /// agent receives on a thread, as the binary does.
    fn start(
        this: &Path,
        pki: &Pki,
        sink: SocketAddr,
        transport: TransportMode,
        certs: &[(PathBuf, PathBuf)],
    ) -> (Self, Vec<SocketAddr>) {
        use std::io::{BufRead, Write};
        let mut list = tempfile::NamedTempFile::new().expect("certificate list");
        for (cert, key) in certs {
            writeln!(list, "{}\t{}", cert.display(), key.display()).expect("certificate list");
        }
        list.flush().expect("certificate list");
        let mut child = std::process::Command::new(this)
            .arg("agents")
            .arg("--sink")
            .arg(sink.to_string())
            .arg("--ca")
            .arg(pki.ca())
            .arg("--certs")
            .arg(list.path())
            .arg("--transport")
            .arg(transport.as_str())
            .args((certs.len() == 1).then_some("--receive-threads"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start relay-perf agents");
        let mut output = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut inputs = Vec::with_capacity(certs.len());
        for line in output.by_ref() {
            let line = line.expect("worker output");
            if line == "ready" {
                break;
            }
            if let Some(addr) = line.strip_prefix("input ") {
                inputs.push(addr.parse().expect("input address"));
            }
        }
        let worker = Self {
            child,
            output,
            _list: list,
        };
        (worker, inputs)
    }

    /// Stops the worker's agents; returns their errors.
    fn stop(mut self) -> Vec<String> {
        drop(self.child.stdin.take());
        let errors: Vec<String> = self
            .output
            .by_ref()
            .map_while(Result::ok)
            .filter_map(|l| l.strip_prefix("error ").map(str::to_owned))
            .collect();
        let _ = self.child.wait();
        errors
    }
}

/// The sFlow agent address of agent `i`: 10.0.0.1, 10.0.0.2, …
fn agent_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0A00_0001u32 + i as u32)
}

/// Issues `n` agent certificates (`agent-0001` …) with `relay-certs`, four at a time.
fn issue_agents(pki: &Pki, n: usize) -> Vec<(PathBuf, PathBuf)> {
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
    if total == 0 {
        // `--scale-rate 0`: the agents stay connected and idle for as long.
        std::thread::sleep(length);
    }
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

/// Raises the limit of open files (each agent holds two sockets, the sink one per agent): to
/// 1,048,576 where the process may (root), else the soft limit to the hard one; returns
/// (soft, hard) after.
fn raise_nofile() -> Option<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANTED: u64 = 1 << 20;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if hard < WANTED && setrlimit(Resource::RLIMIT_NOFILE, WANTED, WANTED).is_ok() {
        return getrlimit(Resource::RLIMIT_NOFILE).ok();
    }
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    getrlimit(Resource::RLIMIT_NOFILE).ok()
}
