//! `relay-agent`: see `relay-agent --help` and the README.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use relay_agent::demo::DemoArgs;
use relay_agent::{Args, Config, Metrics};
use runtime::cli;

const PROGRAM: &str = "relay-agent";

/// relay-agent: receive sFlow over UDP and stream it to one or more relay sinks over mutually
/// authenticated QUIC, or gRPC over TLS where UDP cannot get out. `relay-agent demo` runs a
/// whole relay on this host.
///
/// Every option can also be set in a TOML file (--config) under the same name; several sinks
/// are a `[[sink]]` list there.
#[derive(Debug, Parser)]
#[command(name = "relay-agent", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a sink and an agent on this host with throwaway certificates: the quick start.
    Demo(DemoArgs),
}

fn main() -> ExitCode {
    let parsed = Cli::parse();
    if let Some(Command::Demo(demo)) = parsed.command {
        runtime::telemetry::init(Default::default());
        let rt = tokio::runtime::Runtime::new().expect("start tokio runtime");
        return match rt.block_on(relay_agent::demo::run(demo)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => cli::fail(PROGRAM, &e),
        };
    }
    let args = match cli::prepare(PROGRAM, &parsed.args) {
        Ok(args) => args,
        Err(status) => return status,
    };
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => return cli::usage(PROGRAM, &e),
    };
    let sockets = match relay_agent::bind_listeners(&config) {
        Ok(sockets) => sockets,
        Err(e) => return cli::fail(PROGRAM, &e),
    };
    let rt = match config.threads.runtime() {
        Ok(rt) => rt,
        Err(e) => return cli::fail(PROGRAM, &format!("cannot start the runtime: {e}")),
    };
    let mut links = Vec::new();
    let metrics = Arc::new(Metrics::new(config.observe.sflow_max_streams()));
    let run = relay_agent::run(
        config,
        sockets,
        metrics,
        &mut links,
        runtime::shutdown::signal(),
    );
    match rt.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::fail(PROGRAM, &e),
    }
}
