//! The agent's options: one struct for the command line and the TOML file, and the checked
//! [`Config`] that `run` takes.
//!
//! The common case, one sink, is a set of flags (`--sink`, `--server-name`, `--ca`, `--cert`,
//! `--key`). More sinks are a `[[sink]]` list in the file; each entry may name its own CA,
//! certificate and key, and inherits the top-level ones otherwise.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use runtime::admission::{Accept, Admission};
use runtime::config::duration;
use runtime::daemon::{DEFAULT_SHUTDOWN_GRACE, DaemonOptions};
use runtime::grpc::GrpcOptions;
use runtime::observe::ObserveOptions;
use runtime::quic::QuicOptions;
use runtime::reload::ReloadOptions;
use runtime::route::{Route, RouteConfig, RouteError};
use runtime::threads::ThreadOptions;
use serde::{Deserialize, Serialize};

/// Default listen address: the sFlow port on all IPv4 addresses.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:6343";
/// Default socket receive buffer: 8 MiB holds about 6,000 datagrams of 1,400 bytes, several
/// seconds of a busy site, enough to ride out scheduling hiccups.
pub const DEFAULT_RECV_BUFFER: usize = 8 * 1024 * 1024;
/// Default pause after emptying a receive socket.
pub const DEFAULT_RECV_COALESCE: Duration = Duration::from_millis(1);
/// Default batch size limit: 64 KiB, large enough that per-frame costs vanish (about 45
/// datagrams of 1,400 bytes), small enough to stay far below any frame or message limit.
pub const DEFAULT_BATCH_BYTES: usize = 64 * 1024;
/// Default batch delay: a lone datagram waits at most 5 ms. sFlow analyzers work in seconds,
/// so this costs nothing, and it lets a burst share one frame.
pub const DEFAULT_BATCH_DELAY: Duration = Duration::from_millis(5);
/// Default memory backlog per sink: 128 MiB of frames. At 1,000 datagrams of 1,400 bytes a
/// second it holds a sink outage of well over two minutes without a spool (about 5 minutes of
/// real sFlow, which compresses to about half; 17 minutes of very regular sFlow).
pub const DEFAULT_BACKLOG_BYTES: usize = 128 * 1024 * 1024;

/// Default time `auto` waits for a QUIC handshake before carrying on over gRPC: many round
/// trips on any real path, short enough that a site behind a UDP-blocking firewall loses
/// little time at each (re)connection.
pub const DEFAULT_QUIC_FALLBACK_AFTER: Duration = Duration::from_secs(3);
/// Default interval between QUIC attempts while `auto` runs over gRPC.
pub const DEFAULT_QUIC_RETRY_INTERVAL: Duration = Duration::from_secs(60);

/// Batch compression.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd over each batch's datagrams, for sinks that accept it.
    #[default]
    Zstd,
    /// Batches go as they are.
    None,
}

/// How a link reaches its sink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// QUIC only (UDP).
    Quic,
    /// gRPC only (HTTP/2 over TLS on TCP), for sites that let no UDP out.
    Grpc,
    /// QUIC, falling back to gRPC when no QUIC handshake completes, and back to QUIC when it
    /// works again.
    #[default]
    Auto,
}

impl TransportMode {
    /// The name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Grpc => "grpc",
            Self::Auto => "auto",
        }
    }
}

/// Default bytes of batches unacknowledged on the wire, per sink: 16 MiB keeps a 1 Gbit/s
/// link with 100 ms of round trip busy.
pub const DEFAULT_WINDOW_BYTES: usize = 16 * 1024 * 1024;
/// Default spool size limit per sink.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// Default spool age limit: sFlow analyzers work in real time; data much older than this
/// distorts the present more than it fills the past.
pub const DEFAULT_SPOOL_MAX_AGE: Duration = Duration::from_secs(3600);

/// relay-agent: receive sFlow over UDP and stream it to one or more relay sinks over mutually
/// authenticated QUIC, or gRPC over TLS where UDP cannot get out.
///
/// Every option can also be set in a TOML file (--config) under the same name; several sinks
/// are a `[[sink]]` list there.
#[derive(Debug, Clone, Default, Parser, Serialize, Deserialize)]
#[command(name = "relay-agent", version)]
#[serde(rename_all = "kebab-case")]
pub struct Args {
    /// UDP address to receive sFlow on (repeatable; IPv4 and IPv6). [default: 0.0.0.0:6343]
    #[arg(long, value_name = "ADDR")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<SocketAddr>,

    /// Socket receive buffer to ask the kernel for, bytes. [default: 8 MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recv_buffer: Option<usize>,

    /// After emptying a socket, wait this long before reading it again: under load the agent
    /// then wakes once per interval, not once per datagram. Adds at most this much latency;
    /// 0s reads each datagram as it comes. [default: 1ms]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub recv_coalesce: Option<Duration>,

    /// What to relay: `sflow` (datagrams whose header reads as sFlow v5; the rest is dropped
    /// and counted in relay_agent_not_sflow_datagrams_total by reason) or `any` (every UDP
    /// datagram, for sites that carry other UDP through the relay). [default: sflow]
    #[arg(long, value_enum, value_name = "WHAT")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept: Option<Accept>,

    /// Relay only datagrams whose UDP source is in this network, ADDR/LEN (repeatable; IPv4
    /// and IPv6; IPv4-mapped sources match IPv4 networks). The rest is dropped and counted
    /// as reason="source_not_allowed". [default: any source]
    #[arg(long, value_name = "CIDR")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_sources: Vec<String>,

    /// The sink, HOST:PORT (its QUIC port on UDP and its gRPC port on TCP: the same number). In a
    /// config file, `[[sink]]` entries instead.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_sink)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<Sinks>,

    /// Name the sink's certificate must carry. [default: the HOST of --sink]
    #[arg(long, value_name = "NAME")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,

    /// CA certificate (PEM) the sink's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,

    /// This agent's certificate (PEM, clientAuth), as issued by `relay-certs issue --role agent`.
    #[arg(long, value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,

    /// This agent's private key (PEM).
    #[arg(long, value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,

    /// How to reach the sinks: quic, grpc (TCP, for sites that let no UDP out), or auto (QUIC,
    /// falling back to gRPC and moving back when QUIC works again). [default: auto]
    #[arg(long, value_enum, value_name = "MODE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<TransportMode>,

    /// With --transport auto: time to wait for a QUIC handshake before carrying on over gRPC. [default: 3s]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub quic_fallback_after: Option<Duration>,

    /// With --transport auto, while on gRPC: how often to try QUIC again. [default: 60s]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub quic_retry_interval: Option<Duration>,

    /// Flush a batch when it reaches this many bytes. [default: 65536]
    #[arg(long, value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_bytes: Option<usize>,

    /// Flush a batch this long after its first datagram at the latest. [default: 5ms]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub batch_delay: Option<Duration>,

    /// Compress batches: `zstd` or `none`. Compressed batches go only to sinks that accept them
    /// (negotiated on each connection); older sinks get them plain. [default: zstd]
    #[arg(long, value_enum, value_name = "ALGORITHM")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,

    /// zstd level: 1 is the fastest regular level, up to 19 smaller and slower; negative
    /// levels (down to -7 is useful) faster still and larger. [default: 1]
    #[arg(long, value_name = "LEVEL", allow_negative_numbers = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_level: Option<i32>,

    /// Bytes of batches not yet acknowledged held in memory per sink (compressed frames, plus
    /// 128 bytes of bookkeeping per batch); beyond it the oldest are dropped (counted), or,
    /// with --spool-dir, read back from disk when needed. [default: 128 MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog_bytes: Option<usize>,

    /// Deprecated, replaced by --backlog-bytes: the memory backlog in batches. When given
    /// (and --backlog-bytes is not), the backlog holds this many batches' worth of bytes
    /// (× --batch-bytes), with a warning.
    #[arg(long, value_name = "BATCHES", hide = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_batches: Option<usize>,

    /// Bytes of batches sent and not yet acknowledged, per sink; the sink acknowledges a batch
    /// once it has replayed it. [default: 16 MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_bytes: Option<usize>,

    /// Directory for the disk spool: every batch is written there until its sink acknowledges
    /// it, so an outage of the sink or a restart (even a crash) of the agent loses at most the
    /// last few milliseconds (the batch being formed).
    /// One subdirectory per sink. [default: none, memory only]
    #[arg(long, value_name = "DIR")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool_dir: Option<PathBuf>,

    /// Spool size limit per sink, bytes; beyond it the oldest batches are dropped (counted). [default: 1 GiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool_max_bytes: Option<u64>,

    /// Spooled batches older than this are dropped (counted). [default: 1h]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub spool_max_age: Option<Duration>,

    /// Time allowed for connecting to a sink (QUIC or TCP, and the TLS handshake). [default: 10s]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,

    /// First wait before reconnecting; doubles per failure, with jitter. [default: 200ms]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub reconnect_min: Option<Duration>,

    /// Longest wait between reconnection attempts. [default: 30s]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub reconnect_max: Option<Duration>,

    /// On SIGTERM/SIGINT, time allowed to send what is queued and see it acknowledged. [default: 5s]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub shutdown_grace: Option<Duration>,

    /// Renew the certificate over this sink enrollment address (its --enroll-listen),
    /// HOST:PORT, at two thirds of its lifetime, authenticated by the certificate itself.
    /// A certificate from `relay-agent enroll` renews without it (the agent.renew file next
    /// to it says where). [default: none]
    #[arg(long, value_name = "HOST:PORT")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_from: Option<String>,

    /// The options both ends share (`--config`, `--log-format`, QUIC, gRPC, metrics, reload,
    /// threads, `--ssh-hex`).
    #[command(flatten)]
    #[serde(flatten)]
    pub daemon: DaemonOptions,
}

/// The sinks to send to: one address from the command line, or a `[[sink]]` list from a file.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Sinks {
    /// `--sink HOST:PORT` (or `sink = "HOST:PORT"` in a file).
    One(String),
    /// `[[sink]]` entries.
    Many(Vec<SinkEntry>),
}

/// By hand rather than `untagged`, so a mistake inside a `[[sink]]` entry is reported as
/// itself (say, "unknown field `adr`") instead of "did not match any variant".
impl<'de> Deserialize<'de> for Sinks {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Sinks;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"HOST:PORT\" or a list of [[sink]] tables")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Sinks, E> {
                Ok(Sinks::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Sinks, A::Error> {
                Vec::<SinkEntry>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(Sinks::Many)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// One `[[sink]]` entry of a config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SinkEntry {
    /// HOST:PORT of the sink's QUIC port.
    pub addr: String,
    /// Name the sink's certificate must carry [default: HOST].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// CA for this sink [default: the top-level `ca`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Client certificate for this sink [default: the top-level `cert`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Client key for this sink [default: the top-level `key`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Memory backlog for this sink, bytes [default: the top-level `backlog-bytes`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog_bytes: Option<usize>,
    /// Deprecated, replaced by `backlog-bytes` (× `batch-bytes`, with a warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_batches: Option<usize>,
    /// Transport to this sink [default: the top-level `transport`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<TransportMode>,
    /// Only the sFlow of these agent addresses goes to this sink: prefixes or addresses,
    /// `!` to exclude [default: everything] (see `runtime::route` for the rules).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// When this sink's feed ends (RFC 3339): its link is closed and its backlog and spool
    /// folder removed [default: never].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

/// A configuration that cannot work, said so the user can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `--accept` or `--allow-sources` is wrong (the message names the value).
    #[error("{0}")]
    Admission(String),
    /// A sink address is not `HOST:PORT`.
    #[error(transparent)]
    SinkAddr(#[from] HostPortError),
    /// No sink at all.
    #[error("--sink HOST:PORT is required (or [[sink]] entries in --config)")]
    NoSink,
    /// `sink = []` in the file.
    #[error("no [[sink]] entries")]
    NoSinkEntries,
    /// A top-level `server-name` beside a `[[sink]]` list: which sink would it be for?
    #[error(
        "server-name applies to a single --sink; with [[sink]] entries, give each its own server-name"
    )]
    ServerNameWithList,
    /// A `[[sink]]` entry's `agents` or `not-after` is wrong.
    #[error("sink {sink}: {error}")]
    Route {
        /// The sink's address.
        sink: String,
        /// What is wrong, naming the value.
        error: RouteError,
    },
    /// A sink has no CA, certificate or key file, neither its own nor the top-level one.
    #[error("sink {sink}: no {what} file (--{what}, or `{what}` in its [[sink]] entry)")]
    MissingFile {
        /// The sink's address.
        sink: String,
        /// `ca`, `cert` or `key`.
        what: &'static str,
    },
    /// `--compression-level` outside what zstd has.
    #[error("--compression-level {level}: zstd levels run from {min} to {max}")]
    CompressionLevel {
        /// The level asked for.
        level: i32,
        /// zstd's lowest level.
        min: i32,
        /// zstd's highest level.
        max: i32,
    },
}

/// A sink address that is not `HOST:PORT` (`[v6]:PORT` for IPv6 literals).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    /// No `:PORT`.
    #[error("{0:?} is not HOST:PORT")]
    NotHostPort(String),
    /// The port is not a number from 0 to 65535.
    #[error("{0:?}: bad port {1:?}")]
    BadPort(String, String),
    /// Nothing before the `:`.
    #[error("{0:?}: missing host")]
    MissingHost(String),
}

fn parse_sink(s: &str) -> Result<Sinks, HostPortError> {
    split_host_port(s)?;
    Ok(Sinks::One(s.to_owned()))
}

/// `HOST:PORT` → (host, port), with `[v6]:port` for IPv6 literals.
fn split_host_port(s: &str) -> Result<(String, u16), HostPortError> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| HostPortError::NotHostPort(s.to_owned()))?;
    let port = port
        .parse()
        .map_err(|_| HostPortError::BadPort(s.to_owned(), port.to_owned()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(HostPortError::MissingHost(s.to_owned()));
    }
    Ok((host.to_owned(), port))
}

/// One sink, checked.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// HOST:PORT, resolved at each connection attempt.
    pub addr: String,
    /// Name to verify in the sink's certificate.
    pub server_name: String,
    /// CA file.
    pub ca: PathBuf,
    /// Client certificate file.
    pub cert: PathBuf,
    /// Client key file.
    pub key: PathBuf,
    /// Memory backlog, bytes.
    pub backlog_bytes: usize,
    /// Transport.
    pub transport: TransportMode,
    /// Which datagrams go to this sink, and until when.
    pub route: Route,
}

/// Where an agent's receive loops run. Not an option of the binary, which always has threads;
/// for a program that hosts many agents in one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReceiveOn {
    /// A thread of its own per socket, outside the runtime: nothing on the sending side can
    /// hold up receiving (the binary's choice).
    #[default]
    Threads,
    /// A task per socket on the caller's runtime, so that thousands of agents in one process
    /// (`relay-perf --scale`) share its threads instead of having one each.
    Runtime,
}

/// The agent's checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// UDP listen addresses.
    pub listen: Vec<SocketAddr>,
    /// Receive buffer per socket.
    pub recv_buffer: usize,
    /// Pause after emptying a socket.
    pub recv_coalesce: Duration,
    /// Where the receive loops run.
    pub receive_on: ReceiveOn,
    /// Which received datagrams are relayed.
    pub admission: Admission,
    /// Sinks.
    pub sinks: Vec<SinkConfig>,
    /// Batch flush size.
    pub batch_bytes: usize,
    /// Batch flush delay.
    pub batch_delay: Duration,
    /// zstd level of batch compression; `None`: off.
    pub compression: Option<i32>,
    /// Connection attempt time limit.
    pub connect_timeout: Duration,
    /// With `auto`: QUIC handshake time limit before falling back to gRPC.
    pub quic_fallback_after: Duration,
    /// With `auto`, on gRPC: interval between QUIC attempts.
    pub quic_retry_interval: Duration,
    /// Reconnect backoff floor.
    pub reconnect_min: Duration,
    /// Reconnect backoff ceiling.
    pub reconnect_max: Duration,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// Unacknowledged bytes on the wire per sink.
    pub window_bytes: usize,
    /// Spool directory.
    pub spool_dir: Option<PathBuf>,
    /// Spool size limit per sink.
    pub spool_max_bytes: u64,
    /// Spool age limit.
    pub spool_max_age: Duration,
    /// QUIC tuning.
    pub quic: QuicOptions,
    /// gRPC tuning.
    pub grpc: GrpcOptions,
    /// Metrics endpoint and sFlow accounting.
    pub observe: ObserveOptions,
    /// When to re-read the certificate files.
    pub reload: ReloadOptions,
    /// Worker threads.
    pub threads: ThreadOptions,
    /// Where the certificates renew (`--renew-from`), besides those an `agent.renew` file
    /// says.
    pub renew_from: Option<String>,
    /// What the configuration asked for that is deprecated, one line each, for `run` to log
    /// as warnings.
    pub warnings: Vec<String>,
    /// Where the configuration came from, to read the sinks' routes again on SIGHUP; `None`
    /// without a config file.
    pub source: Option<Source>,
}

/// The command line and the config file a [`Config`] was made of.
#[derive(Debug, Clone)]
pub struct Source {
    /// The options given on the command line (they win over the file's).
    pub cli: Args,
    /// The config file.
    pub file: PathBuf,
}

impl Source {
    /// The command line `cli` and its `--config` file, if it has one.
    pub fn of(cli: &Args) -> Option<Self> {
        cli.daemon.config.clone().map(|file| Self {
            cli: cli.clone(),
            file,
        })
    }

    /// The configuration as it now reads.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or its options are wrong (as at start-up).
    pub fn read(&self) -> Result<Config, String> {
        let args = runtime::config::load(&self.cli, Some(&self.file)).map_err(|e| e.to_string())?;
        Config::try_from(args).map_err(|e| e.to_string())
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let admission =
            runtime::cli::DaemonArgs::admission(&args).map_err(ConfigError::Admission)?;
        let batch_bytes = args
            .batch_bytes
            .unwrap_or(DEFAULT_BATCH_BYTES)
            .clamp(1, proto::wire::DEFAULT_MAX_FRAME_LEN / 4);
        let mut backlog = BacklogSize {
            batch_bytes,
            warnings: Vec::new(),
        };
        let backlog_bytes = backlog.bytes(
            args.backlog_bytes,
            args.queue_batches,
            DEFAULT_BACKLOG_BYTES,
            "",
        );
        let compression = compression(args.compression, args.compression_level)?;
        let sinks = sinks(&args, backlog_bytes, &mut backlog)?;
        let listen = if args.listen.is_empty() {
            vec![DEFAULT_LISTEN.parse().expect("valid default")]
        } else {
            args.listen
        };
        let reconnect_min = args.reconnect_min.unwrap_or(Duration::from_millis(200));
        let connect_timeout = args.connect_timeout.unwrap_or(Duration::from_secs(10));
        Ok(Self {
            listen,
            recv_buffer: args.recv_buffer.unwrap_or(DEFAULT_RECV_BUFFER),
            recv_coalesce: args.recv_coalesce.unwrap_or(DEFAULT_RECV_COALESCE),
            receive_on: ReceiveOn::Threads,
            admission,
            sinks,
            batch_bytes,
            batch_delay: args.batch_delay.unwrap_or(DEFAULT_BATCH_DELAY),
            compression,
            connect_timeout,
            quic_fallback_after: args
                .quic_fallback_after
                .unwrap_or(DEFAULT_QUIC_FALLBACK_AFTER)
                .min(connect_timeout),
            quic_retry_interval: args
                .quic_retry_interval
                .unwrap_or(DEFAULT_QUIC_RETRY_INTERVAL)
                .max(Duration::from_millis(100)),
            reconnect_min,
            reconnect_max: args
                .reconnect_max
                .unwrap_or(Duration::from_secs(30))
                .max(reconnect_min),
            shutdown_grace: args.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            window_bytes: args
                .window_bytes
                .unwrap_or(DEFAULT_WINDOW_BYTES)
                .max(2 * proto::MAX_DATAGRAM_LEN),
            spool_dir: args.spool_dir,
            spool_max_bytes: args.spool_max_bytes.unwrap_or(DEFAULT_SPOOL_MAX_BYTES),
            spool_max_age: args.spool_max_age.unwrap_or(DEFAULT_SPOOL_MAX_AGE),
            quic: args.daemon.quic,
            grpc: args.daemon.grpc,
            observe: args.daemon.observe,
            reload: args.daemon.reload,
            threads: args.daemon.threads,
            renew_from: args.renew_from,
            warnings: backlog.warnings,
            source: None,
        })
    }
}

/// The memory backlog's size, top-level or per sink. `queue-batches` (batches) became
/// `backlog-bytes`: the old option still bounds the memory it implied, with a warning.
struct BacklogSize {
    batch_bytes: usize,
    warnings: Vec<String>,
}

impl BacklogSize {
    /// `bytes` if given, else `batches` × batch size (warned about), else `inherited`. `at`
    /// prefixes the warning (`"sink HOST:PORT: "`, or nothing at the top level).
    fn bytes(
        &mut self,
        bytes: Option<usize>,
        batches: Option<usize>,
        inherited: usize,
        at: &str,
    ) -> usize {
        match (bytes, batches) {
            (Some(bytes), _) => bytes,
            (None, Some(batches)) => {
                let bytes = batches.max(1).saturating_mul(self.batch_bytes);
                self.warnings.push(format!(
                    "{at}queue-batches is deprecated: use backlog-bytes; {batches} batches taken as backlog-bytes = {bytes} (× batch-bytes)"
                ));
                bytes
            }
            (None, None) => inherited,
        }
    }
}

/// The zstd level, or `None` for no compression.
fn compression(
    algorithm: Option<Compression>,
    level: Option<i32>,
) -> Result<Option<i32>, ConfigError> {
    match algorithm.unwrap_or_default() {
        Compression::None => Ok(None),
        Compression::Zstd => {
            let level = level.unwrap_or(proto::compression::DEFAULT_LEVEL);
            let levels = proto::compression::levels();
            if !levels.contains(&level) {
                return Err(ConfigError::CompressionLevel {
                    level,
                    min: *levels.start(),
                    max: *levels.end(),
                });
            }
            Ok(Some(level))
        }
    }
}

/// The sinks, each with its files, name, backlog and transport (its own, or the top-level
/// ones).
fn sinks(
    args: &Args,
    backlog_bytes: usize,
    backlog: &mut BacklogSize,
) -> Result<Vec<SinkConfig>, ConfigError> {
    let entries = match &args.sink {
        None => return Err(ConfigError::NoSink),
        Some(Sinks::One(addr)) => vec![SinkEntry {
            addr: addr.clone(),
            server_name: args.server_name.clone(),
            ca: None,
            cert: None,
            key: None,
            backlog_bytes: None,
            queue_batches: None,
            transport: None,
            agents: Vec::new(),
            not_after: None,
        }],
        Some(Sinks::Many(entries)) if entries.is_empty() => {
            return Err(ConfigError::NoSinkEntries);
        }
        Some(Sinks::Many(_)) if args.server_name.is_some() => {
            return Err(ConfigError::ServerNameWithList);
        }
        Some(Sinks::Many(entries)) => entries.clone(),
    };
    let mut sinks = Vec::with_capacity(entries.len());
    for entry in entries {
        let (host, _) = split_host_port(&entry.addr)?;
        let pick = |own: Option<PathBuf>, top: &Option<PathBuf>, what: &'static str| {
            own.or_else(|| top.clone())
                .ok_or_else(|| ConfigError::MissingFile {
                    sink: entry.addr.clone(),
                    what,
                })
        };
        sinks.push(SinkConfig {
            server_name: entry.server_name.clone().unwrap_or(host),
            ca: pick(entry.ca.clone(), &args.ca, "ca")?,
            cert: pick(entry.cert.clone(), &args.cert, "cert")?,
            key: pick(entry.key.clone(), &args.key, "key")?,
            backlog_bytes: backlog.bytes(
                entry.backlog_bytes,
                entry.queue_batches,
                backlog_bytes,
                &format!("sink {}: ", entry.addr),
            ),
            transport: entry.transport.or(args.transport).unwrap_or_default(),
            route: Route::try_from(&RouteConfig {
                agents: entry.agents.clone(),
                sites: Vec::new(),
                not_after: entry.not_after.clone(),
            })
            .map_err(|error| ConfigError::Route {
                sink: entry.addr.clone(),
                error,
            })?,
            addr: entry.addr,
        });
    }
    Ok(sinks)
}

impl runtime::cli::DaemonArgs for Args {
    fn daemon(&self) -> &DaemonOptions {
        &self.daemon
    }

    fn recv_buffer(&self) -> usize {
        self.recv_buffer.unwrap_or(DEFAULT_RECV_BUFFER)
    }

    fn admission(&self) -> Result<Admission, String> {
        Admission::parse(self.accept.unwrap_or_default(), &self.allow_sources)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("sink.example.com:4433").unwrap(),
            ("sink.example.com".into(), 4433)
        );
        assert_eq!(split_host_port("[::1]:4433").unwrap(), ("::1".into(), 4433));
        assert!(split_host_port("nohost").is_err());
        assert!(split_host_port(":4433").is_err());
    }

    #[test]
    fn mistakes_in_sink_entries_are_reported_as_such() {
        let err = toml::from_str::<Args>("[[sink]]\nadr = \"x:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `adr`"), "{err}");
        let args: Args = toml::from_str("server-name = \"a\"\n[[sink]]\naddr = \"x:1\"\n").unwrap();
        let err = Config::try_from(args).unwrap_err().to_string();
        assert!(err.contains("give each its own server-name"), "{err}");
    }

    #[test]
    fn accept_and_allow_sources_from_a_file() {
        use runtime::cli::DaemonArgs;
        let base = "sink = \"x:1\"\nca = \"c\"\ncert = \"a\"\nkey = \"k\"\n";
        let config = Config::try_from(toml::from_str::<Args>(base).unwrap()).unwrap();
        assert_eq!(config.admission.accept(), Accept::Sflow, "the default");
        assert!(config.admission.allow().is_empty());
        let file = format!(
            "{base}accept = \"any\"\nallow-sources = [\"10.0.0.0/8\", \"2001:db8::/32\"]\n"
        );
        let config = Config::try_from(toml::from_str::<Args>(&file).unwrap()).unwrap();
        assert_eq!(config.admission.accept(), Accept::Any);
        assert_eq!(config.admission.allow().len(), 2);
        let bad = format!("{base}allow-sources = [\"10.0.0.0/40\"]\n");
        let args = toml::from_str::<Args>(&bad).unwrap();
        let err = args.admission().unwrap_err();
        assert!(err.contains("10.0.0.0/40"), "{err}");
        assert_eq!(
            Config::try_from(args).unwrap_err(),
            ConfigError::Admission(err)
        );
        assert!(toml::from_str::<Args>(&format!("{base}accept = \"udp\"\n")).is_err());
    }

    #[test]
    fn sink_list_entries_inherit_top_level_files() {
        let toml = r#"
            ca = "ca.pem"
            cert = "a.pem"
            key = "a.key"
            [[sink]]
            addr = "one.example.com:4433"
            [[sink]]
            addr = "10.0.0.1:4433"
            server-name = "two.example.com"
            ca = "other-ca.pem"
        "#;
        let args: Args = toml::from_str(toml).unwrap();
        let config = Config::try_from(args).unwrap();
        assert_eq!(config.sinks.len(), 2);
        assert_eq!(config.sinks[0].server_name, "one.example.com");
        assert_eq!(config.sinks[0].ca, PathBuf::from("ca.pem"));
        assert_eq!(config.sinks[1].server_name, "two.example.com");
        assert_eq!(config.sinks[1].ca, PathBuf::from("other-ca.pem"));
        assert_eq!(config.sinks[1].cert, PathBuf::from("a.pem"));
    }

    #[test]
    fn sink_entries_take_an_agents_filter_and_a_not_after() {
        let base = "ca = \"c\"\ncert = \"a\"\nkey = \"k\"\n[[sink]]\naddr = \"one:1\"\n[[sink]]\naddr = \"consultant:1\"\n";
        let args: Args = toml::from_str(&format!(
            "{base}agents = [\"10.1.0.0/24\", \"!10.1.0.99\", \"2001:db8:10::/48\"]\nnot-after = \"2027-01-31T18:00:00Z\"\n"
        ))
        .unwrap();
        let config = Config::try_from(args).unwrap();
        assert!(!config.sinks[0].route.is_filtered());
        let route = &config.sinks[1].route;
        assert_eq!(
            route.describe(),
            "agents=10.1.0.0/24,2001:db8:10::/48,!10.1.0.99/32"
        );
        assert_eq!(route.not_after().unwrap().as_str(), "2027-01-31T18:00:00Z");
        let error = |extra: &str| {
            let parsed = toml::from_str::<Args>(&format!("{base}{extra}"));
            match parsed {
                Ok(args) => Config::try_from(args).unwrap_err().to_string(),
                Err(e) => e.to_string(),
            }
        };
        let e = error("agents = [\"10.1.0.0/33\"]\n");
        assert!(
            e.starts_with("sink consultant:1: agents: ") && e.contains("10.1.0.0/33"),
            "{e}"
        );
        let e = error("not-after = \"31 January\"\n");
        assert!(
            e.starts_with("sink consultant:1: not-after: ") && e.contains("RFC 3339"),
            "{e}"
        );
        let e = error("sites = [\"site-a\"]\n");
        assert!(
            e.contains("unknown field `sites`"),
            "sites are the sink's: {e}"
        );
    }

    #[test]
    fn shared_daemon_options_read_from_a_file_as_from_the_command_line() {
        use runtime::cli::DaemonArgs;
        let file = r#"
            sink = "x:1"
            ca = "c"
            cert = "a"
            key = "k"
            log-format = "json"
            keep-alive = "7s"
            grpc-keep-alive = "1m"
            metrics-listen = "127.0.0.1:9108"
            cert-reload-interval = "0s"
            worker-threads = 3
            shutdown-grace = "1m 30s"
        "#;
        let args: Args = toml::from_str(file).unwrap();
        assert_eq!(
            args.daemon().log_format(),
            runtime::telemetry::LogFormat::Json
        );
        let config = Config::try_from(args).unwrap();
        assert_eq!(config.quic.keep_alive, Some(Duration::from_secs(7)));
        assert_eq!(config.grpc.keep_alive(), Duration::from_secs(60));
        assert_eq!(
            config.observe.metrics_listen,
            Some("127.0.0.1:9108".parse().unwrap())
        );
        assert_eq!(config.reload.interval(), None);
        assert_eq!(config.threads.workers(), 3);
        assert_eq!(config.shutdown_grace, Duration::from_secs(90));
        let cli = Args::try_parse_from([
            "relay-agent",
            "--sink=x:1",
            "--ca=c",
            "--cert=a",
            "--key=k",
            "--keep-alive=7s",
            "--shutdown-grace=1m 30s",
            "--config=agent.toml",
        ])
        .unwrap();
        assert_eq!(cli.daemon.config, Some(PathBuf::from("agent.toml")));
        let config = Config::try_from(cli).unwrap();
        assert_eq!(config.quic.keep_alive, Some(Duration::from_secs(7)));
        assert_eq!(config.shutdown_grace, Duration::from_secs(90));
    }
}
