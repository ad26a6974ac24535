//! `relay-demo`: see `relay-demo --help` and the README's quick start.

use std::process::ExitCode;

use clap::Parser;
use runtime::cli;

const PROGRAM: &str = "relay-demo";

/// relay-demo: run a sink and an agent on this host with throwaway certificates, over real
/// QUIC with mutual TLS: the quick start. sFlow sent to --listen is replayed to --forward.
///
/// Production runs relay-agent and relay-sink apart; see the README.
#[derive(Debug, Parser)]
#[command(name = "relay-demo", version)]
struct Cli {
    #[command(flatten)]
    args: relay_demo::Args,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    runtime::telemetry::init(Default::default());
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return cli::fail(PROGRAM, &format!("cannot start the runtime: {e}")),
    };
    match rt.block_on(relay_demo::run(cli.args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::fail(PROGRAM, &e),
    }
}
