//! `relay-sink`: see `relay-sink --help` and the README.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use relay_sink::{Args, Config, Metrics};
use runtime::cli;

const PROGRAM: &str = "relay-sink";

fn main() -> ExitCode {
    let command_line = Args::parse();
    let args = match cli::prepare(PROGRAM, &command_line) {
        Ok(args) => args,
        Err(status) => return status,
    };
    let mut config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => return cli::usage(PROGRAM, &e),
    };
    // `--forward` on the command line replaces the file's list, and a reload of the file
    // would not change it.
    if command_line.forward.is_empty() {
        config.forward_file = command_line.daemon.config;
    }
    let rt = match config.threads.runtime() {
        Ok(rt) => rt,
        Err(e) => return cli::fail(PROGRAM, &format!("cannot start the runtime: {e}")),
    };
    let metrics = Arc::new(Metrics::new(config.observe.sflow_max_streams()));
    rt.block_on(async {
        // Signal handlers first: a SIGTERM during start-up stops the sink cleanly.
        let shutdown = runtime::shutdown::signal();
        let listeners = match relay_sink::bind(&config) {
            Ok(listeners) => listeners,
            Err(e) => return cli::fail(PROGRAM, &e),
        };
        match relay_sink::run(config, listeners, metrics, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => cli::fail(PROGRAM, &e),
        }
    })
}
