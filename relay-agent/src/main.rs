//! `relay-agent`: see `relay-agent --help` and the README.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use relay_agent::demo::DemoArgs;
use relay_agent::{Args, Config, Metrics};

/// relay-agent: receive sFlow over UDP and stream it to one or more relay sinks over mutually
/// authenticated QUIC. `relay-agent demo` runs a whole relay on this host.
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
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("start tokio runtime");
    if let Some(Command::Demo(demo)) = cli.command {
        runtime::telemetry::init(Default::default());
        return match rt.block_on(relay_agent::demo::run(demo)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    let args = match runtime::config::load(&cli.args, cli.args.config.as_deref()) {
        Ok(args) => args,
        Err(e) => return usage(&e),
    };
    runtime::telemetry::init(args.log_format.unwrap_or_default());
    if let Err(e) = args.ssh_hex.check() {
        return usage(&e);
    }
    if args.ssh_hex.ssh_hex {
        let recv_buffer = args
            .recv_buffer
            .unwrap_or(relay_agent::config::DEFAULT_RECV_BUFFER);
        let counters = runtime::ssh_hex::Counters::default();
        return match runtime::ssh_hex::run(&args.ssh_hex, recv_buffer, &counters) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => return usage(&e),
    };
    let sockets = match relay_agent::bind_listeners(&config) {
        Ok(sockets) => sockets,
        Err(e) => return fail(&e),
    };
    let mut links = Vec::new();
    let metrics = Arc::new(Metrics::default());
    let run = relay_agent::run(
        config,
        sockets,
        metrics,
        &mut links,
        runtime::shutdown::signal(),
    );
    match rt.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("relay-agent: error: {e}");
    ExitCode::FAILURE
}

/// A configuration mistake: exit status 64 (EX_USAGE), which a service manager should not
/// retry (see `RestartPreventExitStatus` in the systemd units).
fn usage(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("relay-agent: configuration error: {e}");
    ExitCode::from(64)
}
