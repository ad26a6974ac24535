//! relay-perf: zero-loss rate, CPU and memory of sflow-relay's paths against baselines, all on
//! loopback, all in one run (the machines are shared and noisy: compare within a run).
//!
//! Usage: `cargo run --release -p relay-tests --bin relay-perf -- [--paths …] [--repeats N]`
//!
//! For each path: generator → path → receiver, with realistic sFlow v5 datagrams of about
//! 1,400 bytes. The zero-loss rate is found by a search over rates (each trial sends for
//! `--trial` at a fixed rate and waits for the path to drain; zero loss means every datagram
//! arrived), repeated `--repeats` times, median quoted. CPU per datagram comes from
//! /proc/<pid>/stat over a run at `--cpu-rate`, peak RSS from VmHWM.
//!
//! Paths:
//! - `direct`: generator straight to the receiver (the ceiling of this machine).
//! - `python-hex`: the Python port of sflow_fwd.py piped to itself (no ssh), the practice
//!   sflow-relay replaces.
//! - `ssh-hex`: `relay-agent --ssh-hex | relay-sink --ssh-hex -s …` (no ssh).
//! - `quic`: relay-agent → QUIC with mutual TLS → relay-sink, separate processes.
//! - `grpc`: the same, over gRPC (HTTP/2 + mutual TLS on TCP, the sink's QUIC port number).
//!
//! The agent of `quic` and `grpc` is pinned to its transport (`--transport`), so neither
//! measures the other through the agent's fallback. Their sink replays unpaced
//! (`--replay-max-pps 0`): its default pace protects an untuned collector and would be the
//! ceiling measured here instead of the relay's.
//!
//! Every path's input socket asks for the same receive buffer (`--rcvbuf`; the Python script
//! gets it through tests/python/with_rcvbuf.py, unmodified).

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use relay_tests::sflow::SflowGen;
use relay_tests::{
    Daemon, Pki, Transport, bin, field, free_udp_port, path, pipe, start_agent_over, start_sink,
    wait_udp_bound,
};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    about = "Zero-loss rate, CPU per datagram and peak RSS of sflow-relay's paths on loopback"
)]
struct Cli {
    /// Paths to measure, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [PathKind::Direct, PathKind::PythonHex, PathKind::SshHex, PathKind::Quic, PathKind::Grpc])]
    paths: Vec<PathKind>,
    /// Searches per path; the median is quoted.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Length of one trial at a fixed rate.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    trial: Duration,
    /// Highest rate tried, datagrams per second.
    #[arg(long, default_value_t = 640_000)]
    max_rate: u64,
    /// Fixed rate for the CPU and memory measurement, datagrams per second.
    #[arg(long, default_value_t = 20_000)]
    cpu_rate: u64,
    /// SO_RCVBUF asked for on the input socket of every path that receives (the same for all,
    /// the Python script included, through tests/python/with_rcvbuf.py). The kernel caps it
    /// at net.core.rmem_max.
    #[arg(long, default_value_t = 8 << 20)]
    rcvbuf: usize,
    /// Print every trial (rate, sent, received, kernel drops at the path's input and at the
    /// receiver).
    #[arg(long)]
    verbose: bool,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/relay-perf.json")]
    json: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PathKind {
    Direct,
    PythonHex,
    SshHex,
    Quic,
    Grpc,
}

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::PythonHex => "python-hex",
            Self::SshHex => "ssh-hex",
            Self::Quic => "quic",
            Self::Grpc => "grpc",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Direct => "generator straight to receiver",
            Self::PythonHex => "sflow_fwd.py | sflow_fwd.py -s (Python, no ssh)",
            Self::SshHex => "relay-agent --ssh-hex | relay-sink --ssh-hex -s (no ssh)",
            Self::Quic => "relay-agent → QUIC + mTLS → relay-sink",
            Self::Grpc => "relay-agent → gRPC (HTTP/2 + mTLS, TCP) → relay-sink",
        }
    }

    /// The agent-to-sink transport of a relay path over the network.
    fn transport(self) -> Option<Transport> {
        match self {
            Self::Quic => Some(Transport::Quic),
            Self::Grpc => Some(Transport::Grpc),
            Self::Direct | Self::PythonHex | Self::SshHex => None,
        }
    }
}

/// A path under test: where to send, and the processes to account.
struct Running {
    input: SocketAddr,
    processes: Vec<Daemon>,
    _dir: Option<tempfile::TempDir>,
}

fn start(kind: PathKind, output: SocketAddr, rcvbuf: usize) -> Running {
    let rcvbuf_arg = rcvbuf.to_string();
    let out_port = output.port().to_string();
    match kind {
        PathKind::Direct => Running {
            input: output,
            processes: Vec::new(),
            _dir: None,
        },
        PathKind::PythonHex | PathKind::SshHex => {
            let input = free_udp_port();
            let in_port = input.port().to_string();
            let (left, right) = if kind == PathKind::PythonHex {
                let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python");
                let script = python.join("sflow_fwd.py");
                let mut l = Command::new("python3");
                l.arg(python.join("with_rcvbuf.py"))
                    .arg(&rcvbuf_arg)
                    .arg(&script)
                    .args(["-c", "127.0.0.1", "-p", &in_port]);
                let mut r = Command::new("python3");
                r.arg(&script).args(["-s", "127.0.0.1", "-p", &out_port]);
                (l, r)
            } else {
                let mut l = Command::new(bin("relay-agent"));
                l.args([
                    "--ssh-hex",
                    "-c",
                    "127.0.0.1",
                    "-p",
                    &in_port,
                    "--recv-buffer",
                    &rcvbuf_arg,
                ]);
                l.env("RUST_LOG", "warn");
                let mut r = Command::new(bin("relay-sink"));
                r.args(["--ssh-hex", "-s", "127.0.0.1", "-p", &out_port]);
                (l, r)
            };
            let (l, r) = pipe(left, right);
            wait_udp_bound(input);
            Running {
                input,
                processes: vec![l, r],
                _dir: None,
            }
        }
        PathKind::Quic | PathKind::Grpc => {
            let transport = kind.transport().expect("a relay path has a transport");
            let dir = tempfile::tempdir().expect("temp dir");
            let pki = Pki::new(dir.path());
            // The sink serves gRPC on TCP at its QUIC port number, so one address serves both.
            let (sink, sink_addr) = start_sink(
                &pki,
                &pki.sink_cert("sink"),
                &[output],
                None,
                &["--replay-max-pps", "0"],
            );
            let (agent, input) = start_agent_over(
                transport,
                &pki.ca(),
                &pki.agent_cert("site"),
                sink_addr,
                "localhost",
                &["--recv-buffer", &rcvbuf_arg],
            );
            let connected = agent.wait_for("connected to sink");
            assert_eq!(
                field(&connected, "transport"),
                transport.name(),
                "the agent connected over another transport than asked"
            );
            Running {
                input,
                processes: vec![agent, sink],
                _dir: Some(dir),
            }
        }
    }
}

/// Counts datagrams arriving on a loopback port.
struct Receiver {
    addr: SocketAddr,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind receiver");
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(32 << 20);
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let addr = socket.local_addr().expect("addr");
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !s.load(Ordering::Relaxed) {
                if socket.recv(&mut buf).is_ok() {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self { addr, count, stop }
    }

    /// Waits until nothing has arrived for 300 ms (at most 10 s), then returns the count.
    fn drained(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = self.count.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.count.load(Ordering::Relaxed);
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(300) {
                break;
            }
        }
        last
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends from `pool` (cycling) to `to` at `rate` per second for `length`. Returns how many
/// were sent.
fn send_at(pool: &[Vec<u8>], to: SocketAddr, rate: u64, length: Duration) -> u64 {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind generator");
    let _ = socket2::SockRef::from(&socket).set_send_buffer_size(8 << 20);
    socket.connect(to).expect("connect generator");
    let start = Instant::now();
    let total = (rate as f64 * length.as_secs_f64()) as u64;
    let mut sent = 0u64;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            // A full socket buffer is loss the generator would cause, not the path: retry.
            if socket.send(&pool[(sent as usize) % pool.len()]).is_ok() {
                sent += 1;
            }
        }
        // Short sleeps keep bursts small (about 50 µs of traffic, the timer slack), as traffic
        // from many switches is smooth rather than lumped into millisecond bursts.
        std::thread::sleep(Duration::from_micros(20));
    }
    sent
}

/// One trial: whether every datagram sent at `rate` arrived.
fn zero_loss(pool: &[Vec<u8>], path: &Running, rx: &Receiver, rate: u64, cli: &Cli) -> bool {
    let before = rx.drained();
    let sent = send_at(pool, path.input, rate, cli.trial);
    let received = rx.drained() - before;
    if cli.verbose {
        let drops =
            |a: SocketAddr| runtime::udp::kernel_drops(a).map_or("?".into(), |d| d.to_string());
        eprintln!(
            "    trial {rate}/s: sent {sent}, received {received}; kernel drops so far at input {}, at receiver {}",
            drops(path.input),
            drops(rx.addr)
        );
    }
    received >= sent
}

/// The highest rate with zero loss: doubling from 5,000/s, then bisecting to within 5 %.
fn search(pool: &[Vec<u8>], path: &Running, rx: &Receiver, cli: &Cli) -> u64 {
    let mut lo = 0u64;
    let mut rate = 5_000u64;
    let hi = loop {
        if rate > cli.max_rate {
            return lo;
        }
        if zero_loss(pool, path, rx, rate, cli) {
            lo = rate;
            rate *= 2;
        } else {
            break rate;
        }
    };
    let mut hi = hi;
    for _ in 0..6 {
        if hi - lo <= lo / 20 {
            break;
        }
        let mid = (lo + hi) / 2;
        if zero_loss(pool, path, rx, mid, cli) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// (user + system CPU seconds, peak RSS bytes) of a process.
fn cpu_and_rss(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: utime is the 12th, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (ticks / 100.0, rss_kib * 1024)
}

/// What one path measured.
struct PathResult {
    kind: PathKind,
    /// Median of `rates`.
    median: u64,
    /// Zero-loss rate of each search.
    rates: Vec<u64>,
    /// (CPU µs per datagram, peak RSS bytes) of each process of the path.
    per_process: Vec<(f64, u64)>,
    /// Datagrams sent and delivered in the CPU run.
    sent: u64,
    delivered: u64,
}

impl PathResult {
    fn cpu_us(&self) -> f64 {
        self.per_process.iter().map(|p| p.0).sum()
    }

    fn peak_rss(&self) -> u64 {
        self.per_process.iter().map(|p| p.1).max().unwrap_or(0)
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let cli = Cli::parse();
    let mut generator = SflowGen::new(8, 2, 7);
    let pool: Vec<Vec<u8>> = (0..16_384).map(|_| generator.datagram()).collect();
    let mean_len = pool.iter().map(Vec::len).sum::<usize>() / pool.len();
    eprintln!(
        "relay-perf: {} paths, {} repeats, trials of {:?}, datagrams of {mean_len} bytes on average",
        cli.paths.len(),
        cli.repeats,
        cli.trial
    );
    // Build (or find) the release binaries before timing anything.
    let _ = bin("relay-agent");

    let mut results = Vec::new();
    for &kind in &cli.paths {
        let rx = Receiver::start();
        let path = start(kind, rx.addr, cli.rcvbuf);
        let mut rates = Vec::new();
        for run in 0..cli.repeats {
            let rate = search(&pool, &path, &rx, &cli);
            eprintln!(
                "  {:<11} search {}: {rate} datagrams/s with zero loss (kernel drops at the path's input so far: {})",
                kind.name(),
                run + 1,
                runtime::udp::kernel_drops(path.input).map_or("?".into(), |d| d.to_string())
            );
            rates.push(rate);
        }
        // CPU and memory at a fixed rate, the same for every path.
        let before: Vec<(f64, u64)> = path
            .processes
            .iter()
            .map(|p| cpu_and_rss(p.pid()))
            .collect();
        let start_count = rx.drained();
        let sent = send_at(&pool, path.input, cli.cpu_rate, Duration::from_secs(3));
        let delivered = rx.drained() - start_count;
        let after: Vec<(f64, u64)> = path
            .processes
            .iter()
            .map(|p| cpu_and_rss(p.pid()))
            .collect();
        let per_process: Vec<(f64, u64)> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| ((a.0 - b.0) * 1e6 / sent.max(1) as f64, a.1))
            .collect();
        results.push(PathResult {
            kind,
            median: median(rates.clone()),
            rates,
            per_process,
            sent,
            delivered,
        });
        drop(path);
    }

    let result_of = |k: PathKind| results.iter().find(|r| r.kind == k);
    let rate_of = |k: PathKind| result_of(k).map(|r| r.median);
    let direct = rate_of(PathKind::Direct);
    let python = rate_of(PathKind::PythonHex);
    let quic = rate_of(PathKind::Quic);
    let ratio = |rate: u64, base: Option<u64>| {
        base.filter(|&b| b > 0).map_or("–".to_string(), |b| {
            format!("{:.2}×", rate as f64 / b as f64)
        })
    };

    println!(
        "\n| path | zero-loss datagrams/s (median of {}) | searches | vs direct | vs python-hex | vs quic | CPU µs/datagram at {}/s (per process) | peak RSS |",
        cli.repeats, cli.cpu_rate
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut json_paths = Vec::new();
    for result in &results {
        let PathResult {
            kind,
            median: rate,
            rates,
            per_process,
            sent,
            delivered,
        } = result;
        let (cpu_us, rss) = (result.cpu_us(), result.peak_rss());
        let per = per_process
            .iter()
            .map(|p| format!("{:.1}", p.0))
            .collect::<Vec<_>>()
            .join(" + ");
        let cpu = if per_process.is_empty() {
            "–".to_string()
        } else {
            format!("{cpu_us:.1} ({per})")
        };
        let mem = if rss == 0 {
            "–".to_string()
        } else {
            format!("{:.1} MiB", rss as f64 / (1 << 20) as f64)
        };
        println!(
            "| {} ({}) | {rate} | {} | {} | {} | {} | {cpu} | {mem} |",
            kind.name(),
            kind.describe(),
            rates
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            ratio(*rate, direct),
            ratio(*rate, python),
            ratio(*rate, quic),
        );
        json_paths.push(json!({
            "path": kind.name(),
            "description": kind.describe(),
            "zero_loss_rate_median": rate,
            "zero_loss_rates": rates,
            "vs_direct": direct.map(|d| *rate as f64 / d as f64),
            "vs_python_hex": python.map(|p| *rate as f64 / p as f64),
            "vs_quic": quic.map(|q| *rate as f64 / q as f64),
            "cpu_us_per_datagram": cpu_us,
            "cpu_us_per_datagram_per_process": per_process.iter().map(|p| p.0).collect::<Vec<_>>(),
            "peak_rss_bytes": rss,
            "cpu_run": { "rate": cli.cpu_rate, "sent": sent, "delivered": delivered },
        }));
    }
    // The two transports side by side: the same agent and sink, the same machine, the same run.
    let grpc_vs_quic = result_of(PathKind::Grpc)
        .zip(result_of(PathKind::Quic))
        .map(|(g, q)| {
            let of = |g: f64, q: f64| (q > 0.0).then(|| g / q);
            let rate = of(g.median as f64, q.median as f64);
            let cpu = of(g.cpu_us(), q.cpu_us());
            let rss = of(g.peak_rss() as f64, q.peak_rss() as f64);
            let show = |r: Option<f64>| r.map_or("–".to_string(), |r| format!("{r:.2}×"));
            println!(
                "\ngrpc / quic: zero-loss rate {}, CPU per datagram {}, peak RSS {}",
                show(rate),
                show(cpu),
                show(rss)
            );
            json!({ "zero_loss_rate": rate, "cpu_us_per_datagram": cpu, "peak_rss": rss })
        });
    let report = json!({
        "machine": {
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "rmem_max": std::fs::read_to_string("/proc/sys/net/core/rmem_max").ok().and_then(|s| s.trim().parse::<u64>().ok()),
        },
        "rcvbuf_requested": cli.rcvbuf,
        "datagram_mean_bytes": mean_len,
        "trial_seconds": cli.trial.as_secs_f64(),
        "paths": json_paths,
        "grpc_vs_quic": grpc_vs_quic,
    });
    if let Some(dir) = cli.json.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(
        &cli.json,
        serde_json::to_string_pretty(&report).expect("json"),
    ) {
        Ok(()) => eprintln!("relay-perf: JSON written to {}", path(&cli.json)),
        Err(e) => eprintln!("relay-perf: cannot write {}: {e}", cli.json.display()),
    }
}
