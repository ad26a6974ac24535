//! relay-perf: zero-loss rate, CPU, memory and added latency of sflow-relay's paths against
//! baselines, all on loopback, all in one run (the machines are shared and noisy: compare
//! within a run; the ratios are the headline, absolute figures move between runs).
//!
//! Usage:
//! - `cargo run --release -p relay-tests --bin relay-perf` (every path: about 3 minutes once
//!   the release binaries are built)
//! - `cargo run --release -p relay-tests --bin relay-perf -- --scale 10000` (10,000 agents for
//!   a minute, then one agent at their total rate for a minute)
//!
//! For each path: generator → path → receiver, with realistic sFlow v5 datagrams of about
//! 1,400 bytes ([`relay_tests::sflow::SflowGen`]).
//! - Zero-loss rate: a search over rates (each trial offers `--trial` at a fixed rate and
//!   waits for the path to drain; zero loss means every datagram arrived). A trial the
//!   generator could not offer (achieved rate under 95 % of the target: the machine has two
//!   cores, shared by generator, path and receiver) counts as a failure; the rate quoted is
//!   the achieved rate of the best passing trial. Repeated `--repeats` times, median quoted;
//!   the searches after the first start from the previous result.
//! - CPU per datagram of each process of the path (from /proc/PID/stat) over `--cpu-duration`
//!   at `--cpu-rate`, or at 80 % of the path's zero-loss rate when that is lower.
//! - Peak RSS of each process (VmHWM): over the whole run (overload trials included), and
//!   during one more trial at the zero-loss rate (the peak reset through
//!   /proc/PID/clear_refs first).
//! - One-way latency at `--latency-rate`: fresh datagrams (no two alike), each one's send
//!   instant against its arrival, matched by sFlow (agent, sub-agent, sequence); p50, p99,
//!   p99.9, and the latency each path adds to `direct`'s.
//!
//! Paths:
//! - `direct`: generator straight to the receiver (the ceiling of this machine).
//! - `forwarder`: a plain one-hop UDP forwarder, one recv and one send per datagram with
//!   8 MiB socket buffers asked for, like every path's input (our stand-in for samplicator):
//!   this program, run again as a separate process (the hidden `forward` subcommand).
//! - `python-hex`: the Python port of sflow_fwd.py piped to itself (no ssh), the practice
//!   sflow-relay replaces.
//! - `ssh-hex`: `relay-agent --ssh-hex | relay-sink --ssh-hex -s …` (no ssh).
//! - `quic`: relay-agent → QUIC with mutual TLS → relay-sink, separate processes.
//! - `quic-filtered`: the same, the sink replaying through three `[[forward]]` entries that
//!   filter by sFlow agent (one also by site) and split the datagrams between them, each
//!   replayed once: the cost of routing, read as the sink's CPU per datagram against `quic`'s
//!   (issue 17: at most 1.2 ×). `--paths quic,quic-filtered` runs just the two.
//! - `quic-sflow-metrics`: the same, the sink with `--sflow-metrics` (interface counters of
//!   the counter samples exported for Prometheus): its CPU per datagram against `quic`'s
//!   (issue 18: at most 1.15 ×).
//! - `grpc`: the same, over gRPC (HTTP/2 + mutual TLS on TCP, the sink's QUIC port number).
//!
//! The agent of `quic` and `grpc` is pinned to its transport (`--transport`), so neither
//! measures the other through the agent's fallback. Everything else is the binaries'
//! defaults (batch delay 5 ms; the sink replays live traffic as it arrives and paces only
//! catch-up traffic, which a benchmark without outages has none of).
//!
//! Every path's input socket asks for the same receive buffer (`--rcvbuf`; the Python script
//! gets it through tests/python/with_rcvbuf.py, unmodified); the kernel caps it at
//! net.core.rmem_max, which the report shows. The receiver (the instrument, not a path) forces
//! a large buffer past that cap where it may (root), so that it never is the bottleneck.
//!
//! `--sflow-interfaces N` is another: the sink's memory for N interfaces of
//! `--sflow-metrics` (see [`interfaces`]; issue 18: 10,000 within 16 MiB).
//!
//! `--wire-ratio` is another: the bytes QUIC puts on the wire for the sFlow bytes carried, on
//! random and on text payloads, beside one-shot `zstd -1` of the same datagrams (see [`wire`];
//! issue 20).
//!
//! `--scale N` is a separate mode: N agents (the agent's library, in this process, sharing its
//! threads) connect at once to one relay-sink process and each relays `--scale-rate`
//! datagrams a second for `--scale-duration`; then one agent relays their total rate to a
//! fresh sink. It reports delivery and the sink's CPU per datagram (against the one agent's)
//! and memory. See [`scale`].

mod bench;
mod forwarder;
mod interfaces;
mod load;
mod paths;
mod procs;
mod report;
mod scale;
mod wire;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::paths::PathKind;

#[derive(Debug, Parser)]
#[command(
    about = "Zero-loss rate, CPU per datagram, peak RSS and added latency of sflow-relay's paths on loopback",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    bench: BenchArgs,
    #[command(flatten)]
    scale: scale::ScaleArgs,
    #[command(flatten)]
    interfaces: interfaces::InterfacesArgs,
    #[command(flatten)]
    wire: wire::WireArgs,
}

/// `--payload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PayloadArg {
    Text,
    Random,
}

impl From<PayloadArg> for relay_tests::sflow::Payload {
    fn from(p: PayloadArg) -> Self {
        match p {
            PayloadArg::Text => Self::Text,
            PayloadArg::Random => Self::Random,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The plain UDP forwarder of the `forwarder` path (run by the benchmark itself).
    #[command(hide = true)]
    Forward(forwarder::ForwardArgs),
    /// Agents for `--scale`, in a process of their own (run by the benchmark itself).
    #[command(hide = true)]
    Agents(scale::WorkerArgs),
}

/// Options of the default run (all paths).
#[derive(Debug, Clone, clap::Args)]
struct BenchArgs {
    /// What the generator's sampled packets carry: `text` (its first profile, which
    /// compresses far better than real traffic) or `random` (incompressible payloads, as
    /// encrypted traffic; issue 20's generator).
    #[arg(long, value_enum, default_value_t = PayloadArg::Text)]
    payload: PayloadArg,
    /// Paths to measure, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = PathKind::ALL)]
    paths: Vec<PathKind>,
    /// Searches per path; the median is quoted.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Length of one trial at a fixed rate.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    trial: Duration,
    /// First rate of the first search, datagrams per second (doubled while there is no loss).
    #[arg(long, default_value_t = 20_000)]
    start_rate: u64,
    /// Highest rate tried, datagrams per second.
    #[arg(long, default_value_t = 640_000)]
    max_rate: u64,
    /// Fixed rate for the CPU measurement, datagrams per second (a path whose zero-loss rate
    /// is lower is measured at 80 % of that instead, and the table says so).
    #[arg(long, default_value_t = 50_000)]
    cpu_rate: u64,
    /// Length of the CPU measurement.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    cpu_duration: Duration,
    /// Fixed rate for the latency measurement, datagrams per second.
    #[arg(long, default_value_t = 10_000)]
    latency_rate: u64,
    /// Length of the latency measurement.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    latency_duration: Duration,
    /// SO_RCVBUF asked for on the input socket of every path that receives (the same for all,
    /// the Python script included, through tests/python/with_rcvbuf.py), and SO_SNDBUF of the
    /// forwarder. The kernel caps it at net.core.rmem_max.
    #[arg(long, default_value_t = 8 << 20)]
    rcvbuf: usize,
    /// An extra argument for relay-agent on the quic, quic-plain and grpc paths (repeat for
    /// more, e.g. `--agent-arg=--worker-threads=2`).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    agent_arg: Vec<String>,
    /// An extra argument for relay-sink on the quic, quic-plain and grpc paths.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    sink_arg: Vec<String>,
    /// Print every trial (target and achieved rate, sent, received, kernel drops at the
    /// path's input and at the receiver).
    #[arg(long)]
    verbose: bool,
    /// Where to write the JSON results [default: target/relay-perf.json, with --scale
    /// target/relay-perf-scale.json].
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Forward(args)) => forwarder::run(&args),
        Some(Command::Agents(args)) => scale::worker(&args),
        None if cli.interfaces.sflow_interfaces.is_some() => {
            let json = cli
                .bench
                .json
                .unwrap_or_else(|| "target/relay-perf-sflow-interfaces.json".into());
            let n = cli.interfaces.sflow_interfaces.unwrap_or(10_000);
            write_json(&json, &interfaces::run(n));
        }
        None if cli.wire.wire_ratio => {
            let json = cli
                .bench
                .json
                .unwrap_or_else(|| "target/relay-perf-wire.json".into());
            write_json(&json, &wire::run(&cli.wire));
        }
        None if cli.scale.scale.is_some() => {
            let json = cli
                .bench
                .json
                .unwrap_or_else(|| "target/relay-perf-scale.json".into());
            scale::run(&cli.scale, &json);
        }
        None => {
            let json = cli
                .bench
                .json
                .clone()
                .unwrap_or_else(|| "target/relay-perf.json".into());
            bench::run(&cli.bench, &json);
        }
    }
}

/// Writes `value` as pretty JSON to `to` (creating its folder), saying where on stderr.
fn write_json(to: &std::path::Path, value: &serde_json::Value) {
    if let Some(dir) = to.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(to, serde_json::to_string_pretty(value).expect("json")) {
        Ok(()) => eprintln!("relay-perf: JSON written to {}", to.display()),
        Err(e) => eprintln!("relay-perf: cannot write {}: {e}", to.display()),
    }
}
