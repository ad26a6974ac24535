//! `relay-sink`: see `relay-sink --help` and the README.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use relay_sink::{Args, Config, Metrics};
use runtime::cli;
use runtime::udp::{self, Buffers};

const PROGRAM: &str = "relay-sink";

fn main() -> ExitCode {
    let args = match cli::prepare(PROGRAM, &Args::parse()) {
        Ok(args) => args,
        Err(status) => return status,
    };
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => return cli::usage(PROGRAM, &e),
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
            Err(e) => {
                return cli::fail(PROGRAM, &format!("cannot listen on {}: {e}", config.listen));
            }
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
            Err(e) => cli::fail(PROGRAM, &e),
        }
    })
}
