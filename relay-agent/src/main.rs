//! `relay-agent`: see `relay-agent --help` and the README.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use relay_agent::{Args, Config, Metrics};
use runtime::cli;

const PROGRAM: &str = "relay-agent";

/// relay-agent: receive sFlow over UDP and stream it to one or more relay sinks over mutually
/// authenticated QUIC, or gRPC over TLS where UDP cannot get out. `relay-demo` runs a whole
/// relay on this host.
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
    /// Obtain this site's certificate from a sink's enrollment port with a one-time token
    /// (`relay-certs token`): the key is made here and never leaves; writes DIR/ca.pem,
    /// DIR/agent.pem and DIR/agent.key, and DIR/agent.renew so that the agent renews it.
    Enroll(relay_agent::enroll::EnrollArgs),
    /// Moved to `relay-demo` (the quick start): runs the relay-demo program installed next to
    /// this one, with these arguments.
    #[command(disable_help_flag = true)]
    Demo {
        /// The arguments of relay-demo (see `relay-demo --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let parsed = Cli::parse();
    match parsed.command {
        Some(Command::Demo { args }) => return run_relay_demo(args),
        Some(Command::Enroll(args)) => return enroll(&args),
        None => {}
    }
    let args = match cli::prepare(PROGRAM, &parsed.args) {
        Ok(args) => args,
        Err(status) => return status,
    };
    let mut config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => return cli::usage(PROGRAM, &e),
    };
    config.source = relay_agent::config::Source::of(&parsed.args);
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
    // Signal handlers first: a SIGTERM during start-up stops the agent cleanly.
    let shutdown = {
        let _runtime = rt.enter();
        runtime::shutdown::signal()
    };
    let run = relay_agent::run(config, sockets, metrics, &mut links, shutdown);
    match rt.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::fail(PROGRAM, &e),
    }
}

/// `relay-agent enroll`: exit 0 when enrolled (or already), 1 with the reason otherwise.
fn enroll(args: &relay_agent::enroll::EnrollArgs) -> ExitCode {
    use relay_agent::enroll::{CA_FILE, CERT_FILE, Enrolled, KEY_FILE};
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return cli::fail(PROGRAM, &format!("cannot start the runtime: {e}")),
    };
    let dir = args.dir.display();
    match rt.block_on(relay_agent::enroll::enroll(args)) {
        Ok(Enrolled::Done { name, not_after }) => {
            println!(
                "enrolled as {name}: {dir}/{CERT_FILE} (valid until {not_after}), {dir}/{KEY_FILE} (made here, never sent) and {dir}/{CA_FILE}; it renews automatically.\nstart the agent with: --ca {dir}/{CA_FILE} --cert {dir}/{CERT_FILE} --key {dir}/{KEY_FILE}"
            );
            ExitCode::SUCCESS
        }
        Ok(Enrolled::Already { name, not_after }) => {
            println!(
                "already enrolled as {name} in {dir} (certificate valid until {not_after}): nothing to do"
            );
            ExitCode::SUCCESS
        }
        Err(e) => cli::fail(PROGRAM, &e),
    }
}

/// `relay-agent demo …`, from before the demo became its own program: replaces this process
/// with the `relay-demo` next to this executable, or exits 2 (a usage error, as clap's) saying
/// what to run instead.
fn run_relay_demo(args: Vec<OsString>) -> ExitCode {
    let next_to_this = std::env::current_exe().map(|exe| exe.with_file_name("relay-demo"));
    let Some(demo) = next_to_this.ok().filter(|demo| demo.is_file()) else {
        eprintln!(
            "{PROGRAM}: error: `relay-agent demo` is now `relay-demo` (`cargo run --release -p relay-demo`), which is not installed next to relay-agent"
        );
        return ExitCode::from(2);
    };
    eprintln!(
        "{PROGRAM}: warning: `relay-agent demo` is now `relay-demo`; running {}",
        demo.display()
    );
    let e = std::process::Command::new(&demo).args(args).exec();
    cli::fail(PROGRAM, &format!("cannot run {}: {e}", demo.display()))
}
