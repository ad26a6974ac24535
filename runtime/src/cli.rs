//! What both binaries do between parsing the command line and starting their real work: read
//! the config file, start logging, run the `--ssh-hex` mode when asked, and exit with the
//! right status on failure.

use std::fmt::Display;
use std::process::ExitCode;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::admission::Admission;
use crate::daemon::DaemonOptions;
use crate::ssh_hex;
use crate::telemetry;

/// Exit status of a configuration mistake: EX_USAGE, which a service manager should not
/// retry (`RestartPreventExitStatus=64` in the systemd units).
pub const EXIT_USAGE: u8 = 64;

/// What the steps shared here need of a daemon's options struct.
pub trait DaemonArgs: Serialize + DeserializeOwned + clap::CommandFactory {
    /// The options both daemons share (`--config`, `--log-format`, `--ssh-hex`, ...).
    fn daemon(&self) -> &DaemonOptions;
    /// `--recv-buffer`, or the daemon's default.
    fn recv_buffer(&self) -> usize;
    /// Which received datagrams the `--ssh-hex` collector writes; by default, all.
    ///
    /// # Errors
    ///
    /// A message saying which option is wrong (as [`Admission::parse`] words it).
    fn admission(&self) -> Result<Admission, String> {
        Ok(Admission::default())
    }
}

/// Loads the config file under `cli`, starts logging and, with `--ssh-hex`, runs that mode
/// to its end. `Ok(args)` to go on with the daemon's own work; `Err(status)` to exit.
///
/// # Errors
///
/// The exit status when the configuration is wrong (64, said on stderr) or the ssh-hex mode
/// ran (0 at the end of its input or on SIGTERM or SIGINT, or 1 with its error).
pub fn prepare<A: DaemonArgs>(program: &str, cli: &A) -> Result<A, ExitCode> {
    let config_file = cli.daemon().config.as_deref();
    let args = crate::config::load(cli, config_file).map_err(|e| usage(program, &e))?;
    let daemon = args.daemon();
    telemetry::init(daemon.log_format());
    daemon.ssh_hex.check().map_err(|e| usage(program, &e))?;
    if daemon.ssh_hex.ssh_hex {
        let admission = args.admission().map_err(|e| usage(program, &e))?;
        let counters = ssh_hex::Counters::default();
        return Err(
            match ssh_hex::run(&daemon.ssh_hex, args.recv_buffer(), &admission, &counters) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(program, &e),
            },
        );
    }
    Ok(args)
}

/// Says `PROGRAM: error: …` on stderr; exit status 1.
pub fn fail(program: &str, e: &dyn Display) -> ExitCode {
    eprintln!("{program}: error: {e}");
    ExitCode::FAILURE
}

/// Says `PROGRAM: configuration error: …` on stderr; exit status 64.
pub fn usage(program: &str, e: &dyn Display) -> ExitCode {
    eprintln!("{program}: configuration error: {e}");
    ExitCode::from(EXIT_USAGE)
}
