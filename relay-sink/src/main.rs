//! `relay-sink`: see `relay-sink --help` and the README.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use relay_sink::{Args, Config, Metrics};
use runtime::udp::{self, Buffers};

fn main() -> ExitCode {
    let cli = Args::parse();
    let args = match runtime::config::load(&cli, cli.config.as_deref()) {
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
            .unwrap_or(relay_sink::config::DEFAULT_RECV_BUFFER);
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
    let rt = tokio::runtime::Runtime::new().expect("start tokio runtime");
    rt.block_on(async {
        // The QUIC socket carries every agent's traffic: give it room for bursts.
        let size = Some(config.recv_buffer);
        let buffers = Buffers {
            recv: size,
            send: size,
        };
        let socket = match udp::bind(config.listen, buffers) {
            Ok(socket) => socket,
            Err(e) => return fail(&format!("cannot listen on {}: {e}", config.listen)),
        };
        match relay_sink::run(
            config,
            socket,
            Arc::new(Metrics::default()),
            runtime::shutdown::signal(),
        )
        .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        }
    })
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("relay-sink: error: {e}");
    ExitCode::FAILURE
}

/// A configuration mistake: exit status 64 (EX_USAGE), which a service manager should not
/// retry (see `RestartPreventExitStatus` in the systemd units).
fn usage(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("relay-sink: configuration error: {e}");
    ExitCode::from(64)
}
