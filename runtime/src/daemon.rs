//! The options both daemons have and mean the same by, declared once: `--config`,
//! `--log-format`, QUIC and gRPC tuning, the metrics endpoint, certificate reloading, worker
//! threads and the `--ssh-hex` mode.
//!
//! Each binary's `Args` flattens [`DaemonOptions`] (`#[command(flatten)]` for clap,
//! `#[serde(flatten)]` for the file), so the flags, the file's keys and the help texts are the
//! same on both ends, and a change to one of them reaches both.
//!
//! What stays in each binary's own options, though the name is shared: what the option
//! means there differs, so its help text does (`--shutdown-grace`: sending what is queued on
//! the agent, replaying what was received on the sink; `--listen`, `--recv-buffer`, `--ca`,
//! `--cert`, `--key`: the other end's certificates, a different socket).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::grpc::GrpcOptions;
use crate::observe::ObserveOptions;
use crate::quic::QuicOptions;
use crate::reload::ReloadOptions;
use crate::ssh_hex::SshHexOptions;
use crate::telemetry::LogFormat;
use crate::threads::ThreadOptions;

/// Default time allowed on SIGTERM/SIGINT to finish what is under way (each end's
/// `--shutdown-grace`).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The options both daemons share (flags and config keys alike).
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DaemonOptions {
    /// TOML file with any of these options; the command line wins over it.
    #[arg(long, value_name = "FILE", display_order = 0)]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Log line format (filter with RUST_LOG, e.g. RUST_LOG=debug). [default: text]
    #[arg(long, value_enum, value_name = "FORMAT")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,

    /// QUIC tuning.
    #[command(flatten)]
    #[serde(flatten)]
    pub quic: QuicOptions,

    /// gRPC tuning.
    #[command(flatten)]
    #[serde(flatten)]
    pub grpc: GrpcOptions,

    /// The metrics endpoint and sFlow accounting.
    #[command(flatten)]
    #[serde(flatten)]
    pub observe: ObserveOptions,

    /// When to re-read the certificate files.
    #[command(flatten)]
    #[serde(flatten)]
    pub reload: ReloadOptions,

    /// Worker threads.
    #[command(flatten)]
    #[serde(flatten)]
    pub threads: ThreadOptions,

    /// The `--ssh-hex` mode.
    #[command(flatten)]
    #[serde(flatten)]
    pub ssh_hex: SshHexOptions,
}

impl DaemonOptions {
    /// `--log-format`, or its default.
    pub fn log_format(&self) -> LogFormat {
        self.log_format.unwrap_or_default()
    }
}
