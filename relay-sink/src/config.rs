//! The sink's options: one struct for the command line and the TOML file, and the checked
//! [`Config`] that `run` takes. The replay destinations (`--forward`, `[[forward]]`) are
//! [`forward`]'s.

pub mod forward;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use runtime::config::duration;
use runtime::daemon::{DEFAULT_SHUTDOWN_GRACE, DaemonOptions};
use runtime::grpc::GrpcOptions;
use runtime::observe::ObserveOptions;
use runtime::quic::QuicOptions;
use runtime::reload::ReloadOptions;
use runtime::threads::ThreadOptions;
use serde::{Deserialize, Serialize};

pub use forward::{ForwardConfig, ForwardError};

/// Default QUIC listen address (UDP).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";
/// Default kernel buffer of the QUIC socket: it carries every agent's traffic, in bursts.
pub const DEFAULT_RECV_BUFFER: usize = 8 * 1024 * 1024;
/// Default queue per destination, in batches (64 KiB each by the agent's default).
pub const DEFAULT_REPLAY_QUEUE: usize = 1024;
/// Default catch-up pace: agents' catch-up traffic (backlogs drained after an outage) reaches
/// each destination at 5,000 datagrams a second on top of the live traffic, in bursts of at
/// most 20. A collector with the kernel's default socket buffer (about 90 datagrams of
/// 1,400 bytes) takes that without loss. Live traffic is not paced.
pub const DEFAULT_CATCH_UP_MAX_PPS: u64 = 5_000;
/// Default send buffer of each replay socket.
pub const DEFAULT_SEND_BUFFER: usize = 4 * 1024 * 1024;
/// Default limit on agent connections, handshakes in progress included: room for 10,000 sites
/// on one sink with headroom (an agent on `--transport auto` may hold two for a moment); a
/// connected low-rate agent costs the sink about 70 KiB, so the limit is about 1 GiB.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// Default time a frame may take to arrive once its first byte has: a frame announcing a
/// length and then stalling must not hold its buffer and its stream forever (QUIC's idle
/// timeout does not end a connection whose keep-alives are answered).
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit on one datagram in a batch: the largest UDP payload over IPv6 (65,535 − 8),
/// the largest any agent can have received.
pub const DEFAULT_MAX_DATAGRAM_BYTES: usize = 65_527;

/// relay-sink: accept relay agents over mutually authenticated QUIC and gRPC (TLS on TCP, same
/// port number) and replay every sFlow datagram they carry, byte for byte, as UDP to each
/// --forward destination.
///
/// Every option can also be set in a TOML file (--config) under the same name.
#[derive(Debug, Clone, Default, Parser, Serialize, Deserialize)]
#[command(name = "relay-sink", version)]
#[serde(rename_all = "kebab-case")]
pub struct Args {
    /// QUIC listen address (UDP). [default: 0.0.0.0:4433]
    #[arg(long, value_name = "ADDR")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,

    /// gRPC listen address (TCP), or `off`. [default: the address and port of --listen, so one
    /// port number serves both transports]
    #[arg(long, value_name = "ADDR|off", value_parser = parse_grpc_listen)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<GrpcListen>,

    /// Receive (and send) buffer to ask the kernel for on the QUIC socket, bytes. [default: 8 MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recv_buffer: Option<usize>,

    /// CA certificate (PEM) that agents' certificates must chain to.
    #[arg(long, value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,

    /// This sink's certificate (PEM, serverAuth), as issued by `relay-certs issue --role sink`.
    #[arg(long, value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,

    /// This sink's private key (PEM).
    #[arg(long, value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,

    /// Certificate revocation list (PEM, from `relay-certs init` or `revoke`): agents it lists
    /// are refused at the handshake, and closed if connected when a changed list is reloaded.
    /// Reloaded with the certificates. A file that does not exist yet is warned about and
    /// loaded when it appears; one that disappears or breaks later is an error, and the list
    /// in use stays. [default: none]
    #[arg(long, value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,

    /// File of the agent names (certificate common names) allowed to connect, one per line,
    /// `#` comments; others are refused, and connected ones closed when a changed list is
    /// reloaded. Reloaded with the certificates. [default: none, every agent of the CA]
    #[arg(long, value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_agents: Option<PathBuf>,

    /// Replay destination HOST:PORT, e.g. an sFlow-RT collector (repeatable: each gets every
    /// datagram). In a config file, `[[forward]]` tables may also filter by sFlow agent and
    /// site and end at a time (`addr`, `agents`, `sites`, `not-after`); on the command line
    /// the same as an inline table, `{ addr = "HOST:PORT", sites = ["site-a"] }`.
    #[arg(long, value_name = "HOST:PORT")]
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "forward::deserialize"
    )]
    pub forward: Vec<String>,

    /// Batches queued per destination; when full, a batch waits up to 5 s for room, then is
    /// dropped for that destination (counted). [default: 1024]
    #[arg(long, value_name = "BATCHES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_queue: Option<usize>,

    /// Catch-up pace: datagrams a second of the agents' catch-up traffic (batches sent again
    /// after a reconnect, read back from a spool, held back by an outage), all agents
    /// together, on top of the live traffic, which is never paced; each agent that catches
    /// up may also send its own live rate. So a backlog drains without overflowing a
    /// collector's socket. 0: catch-up is not paced. [default: 5000]
    #[arg(long, value_name = "DATAGRAMS")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up_max_pps: Option<u64>,

    /// Hard cap: most datagrams a second sent to each destination, live traffic included
    /// (0: no cap). Off by default: live traffic should not wait; the catch-up pace protects
    /// collectors while backlogs drain. [default: 0]
    #[arg(long, value_name = "DATAGRAMS")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_max_pps: Option<u64>,

    /// Hard cap: most bytes (UDP payload) a second sent to each destination (0: no cap).
    /// [default: 0]
    #[arg(long, value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_max_bps: Option<u64>,

    /// Send buffer asked for each replay socket, bytes. [default: 4 MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_buffer: Option<usize>,

    /// Largest frame accepted from an agent, bytes; a larger one ends that agent's stream (QUIC: its connection). [default: 4 MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<usize>,

    /// Time allowed for an agent's TLS handshake. [default: 10s]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub handshake_timeout: Option<Duration>,

    /// Most agent connections at once, handshakes in progress included, over both transports;
    /// one more is refused at once (counted). [default: 16384]
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,

    /// Time a frame may take to arrive once its first byte has; a frame still incomplete after
    /// it ends that agent's connection (QUIC) as a protocol violation. [default: 30s]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub frame_timeout: Option<Duration>,

    /// Largest datagram accepted in a batch, bytes; a larger one is dropped (counted per agent)
    /// and the rest of its batch replayed. [default: 65527]
    #[arg(long, value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_datagram_bytes: Option<usize>,

    /// Most datagrams a second replayed from each agent identity (the name in its certificate,
    /// all its connections together); beyond it datagrams are dropped (counted per agent). 0:
    /// no limit. [default: 0]
    #[arg(long, value_name = "DATAGRAMS")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_max_pps: Option<u64>,
    /// Most connections open at once with one agent identity (certificate name); a connection
    /// beyond it is refused. 0: no limit. [default: 0]
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_agent: Option<usize>,

    /// On SIGTERM/SIGINT, time allowed to finish replaying what was received. [default: 5s]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub shutdown_grace: Option<Duration>,

    /// Export the interface counters of the sFlow the agents send (counter samples: generic
    /// and Ethernet interface records) as Prometheus metrics, at /metrics/sflow on
    /// --metrics-listen. [default: off]
    #[arg(long)]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sflow_metrics: bool,

    /// With --sflow-metrics: the series of an interface not heard from for this long
    /// disappear. [default: 5m]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub sflow_metrics_expiry: Option<Duration>,

    /// With --sflow-metrics: most series exported; counter samples of new interfaces beyond
    /// it are not taken (counted in relay_sink_sflow_metrics_series_dropped_total).
    /// [default: 100000]
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sflow_metrics_max_series: Option<usize>,

    /// Serve enrollment on this TCP address: agents obtain a certificate with a one-time
    /// token (`relay-certs token`) and renew it with the one they hold, their keys made at the
    /// site (`relay-agent enroll`). gRPC over TLS, the sink's certificate; a port of its own,
    /// the relay ports stay mutual-TLS only. Needs --enroll-issuer. [default: off]
    #[arg(long, value_name = "ADDR")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_listen: Option<SocketAddr>,

    /// The issuing CA folder enrollment signs with (`relay-certs init-issuer`: issuer.pem,
    /// issuer.key, ca.pem); the sink keeps the ledger of used tokens there (tokens.log), so
    /// the folder must be writable by the sink's user.
    #[arg(long, value_name = "DIR")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_issuer: Option<PathBuf>,

    /// Validity of the certificates enrollment and renewal issue; agents renew at two
    /// thirds of it. [default: 30d]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub enroll_validity: Option<Duration>,

    /// The options both ends share (`--config`, `--log-format`, QUIC, gRPC, metrics, reload,
    /// threads, `--ssh-hex`).
    #[command(flatten)]
    #[serde(flatten)]
    pub daemon: DaemonOptions,
}

/// Where the gRPC port listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum GrpcListen {
    /// No gRPC port.
    Off,
    /// This TCP address.
    At(SocketAddr),
}

/// A `--grpc-listen` value that is neither an address nor `off`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither an address (IP:PORT) nor `off`")]
pub struct GrpcListenError(String);

fn parse_grpc_listen(s: &str) -> Result<GrpcListen, GrpcListenError> {
    if s == "off" {
        Ok(GrpcListen::Off)
    } else {
        s.parse()
            .map(GrpcListen::At)
            .map_err(|_| GrpcListenError(s.to_owned()))
    }
}

impl TryFrom<String> for GrpcListen {
    type Error = GrpcListenError;
    fn try_from(s: String) -> Result<Self, GrpcListenError> {
        parse_grpc_listen(&s)
    }
}

impl From<GrpcListen> for String {
    fn from(g: GrpcListen) -> Self {
        match g {
            GrpcListen::Off => "off".into(),
            GrpcListen::At(addr) => addr.to_string(),
        }
    }
}

/// A configuration that cannot work, said so the user can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A file every sink needs is not given (`ca`, `cert` or `key`).
    #[error("--{0} is required (see `relay-sink --help`)")]
    Missing(&'static str),
    /// No replay destination.
    #[error("at least one --forward HOST:PORT is required: where to replay datagrams")]
    NoForward,
    /// A replay destination that is not `HOST:PORT`, a `[[forward]]` entry that does not
    /// read, or a list whose every entry has ended.
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// `--max-frame-bytes` below what the largest datagram needs.
    #[error(
        "--max-frame-bytes {0} is too small: a frame must hold the largest datagram ({max} bytes)",
        max = proto::MAX_DATAGRAM_LEN
    )]
    MaxFrameTooSmall(usize),
}

/// The sink's checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// gRPC listen address; `None` for no gRPC port. The same as `listen` by default.
    pub grpc_listen: Option<SocketAddr>,
    /// Kernel buffer size for the QUIC socket.
    pub recv_buffer: usize,
    /// CA certificate file.
    pub ca: PathBuf,
    /// Own certificate file.
    pub cert: PathBuf,
    /// Own key file.
    pub key: PathBuf,
    /// Certificate revocation list file, if any.
    pub crl: Option<PathBuf>,
    /// Allow-list file, if any.
    pub allowed_agents: Option<PathBuf>,
    /// Replay destinations, checked (resolved at start).
    pub forward: Vec<ForwardConfig>,
    /// The config file whose `[[forward]]` filters and `not-after` are applied again on
    /// reload: set (by `main`) when the destinations came from a file rather than from
    /// `--forward` on the command line. `None`: not reloaded.
    pub forward_file: Option<PathBuf>,
    /// Batches queued per destination.
    pub replay_queue: usize,
    /// Send buffer per replay socket.
    pub send_buffer: usize,
    /// Catch-up pace, datagrams a second (0: none).
    pub catch_up_max_pps: u64,
    /// Pace per destination, datagrams a second (0: none).
    pub replay_max_pps: u64,
    /// Pace per destination, bytes a second (0: none).
    pub replay_max_bps: u64,
    /// Largest frame accepted.
    pub max_frame_bytes: usize,
    /// TLS handshake time limit.
    pub handshake_timeout: Duration,
    /// Most agent connections at once (handshakes included).
    pub max_connections: usize,
    /// Time a frame may take once its first byte has arrived.
    pub frame_timeout: Duration,
    /// Largest datagram accepted in a batch.
    pub max_datagram_bytes: usize,
    /// Datagrams a second replayed per agent identity (0: no limit).
    pub agent_max_pps: u64,
    /// Connections allowed per agent identity (0: no limit).
    pub max_connections_per_agent: usize,
    /// Time to finish replaying on shutdown.
    pub shutdown_grace: Duration,
    /// sFlow interface metrics (`--sflow-metrics`): `None` when off.
    pub sflow_metrics: Option<SflowMetricsOptions>,
    /// Enrollment (`--enroll-listen`): `None` when off.
    pub enroll: Option<EnrollOptions>,
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
}

/// `--enroll-listen` and what it signs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollOptions {
    /// Where enrollment is served (TCP).
    pub listen: SocketAddr,
    /// The issuing CA folder.
    pub issuer: PathBuf,
    /// Validity of the certificates issued.
    pub validity: Duration,
}

/// Default of `--enroll-validity`: 30 days.
pub const DEFAULT_ENROLL_VALIDITY: Duration = Duration::from_secs(30 * 86_400);

/// `--sflow-metrics` and its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SflowMetricsOptions {
    /// An interface silent this long disappears.
    pub expiry: Duration,
    /// Most series exported.
    pub max_series: usize,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let need = |v: Option<PathBuf>, flag: &'static str| v.ok_or(ConfigError::Missing(flag));
        if args.forward.is_empty() {
            return Err(ConfigError::NoForward);
        }
        let forward = forward::parse_all(&args.forward, std::time::SystemTime::now())?;
        let max_frame_bytes = args
            .max_frame_bytes
            .unwrap_or(proto::wire::DEFAULT_MAX_FRAME_LEN);
        if max_frame_bytes < 2 * proto::MAX_DATAGRAM_LEN {
            return Err(ConfigError::MaxFrameTooSmall(max_frame_bytes));
        }
        let listen = args
            .listen
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        Ok(Self {
            listen,
            grpc_listen: match args.grpc_listen {
                None => Some(listen),
                Some(GrpcListen::Off) => None,
                Some(GrpcListen::At(addr)) => Some(addr),
            },
            recv_buffer: args.recv_buffer.unwrap_or(DEFAULT_RECV_BUFFER),
            ca: need(args.ca, "ca")?,
            cert: need(args.cert, "cert")?,
            key: need(args.key, "key")?,
            crl: args.crl,
            allowed_agents: args.allowed_agents,
            forward,
            forward_file: None,
            replay_queue: args.replay_queue.unwrap_or(DEFAULT_REPLAY_QUEUE).max(1),
            send_buffer: args.send_buffer.unwrap_or(DEFAULT_SEND_BUFFER),
            catch_up_max_pps: args.catch_up_max_pps.unwrap_or(DEFAULT_CATCH_UP_MAX_PPS),
            replay_max_pps: args.replay_max_pps.unwrap_or(0),
            replay_max_bps: args.replay_max_bps.unwrap_or(0),
            max_frame_bytes,
            handshake_timeout: args.handshake_timeout.unwrap_or(Duration::from_secs(10)),
            max_connections: args
                .max_connections
                .unwrap_or(DEFAULT_MAX_CONNECTIONS)
                .max(1),
            frame_timeout: args
                .frame_timeout
                .unwrap_or(DEFAULT_FRAME_TIMEOUT)
                .max(Duration::from_millis(100)),
            max_datagram_bytes: args
                .max_datagram_bytes
                .unwrap_or(DEFAULT_MAX_DATAGRAM_BYTES),
            agent_max_pps: args.agent_max_pps.unwrap_or(0),
            max_connections_per_agent: args.max_connections_per_agent.unwrap_or(0),
            shutdown_grace: args.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            sflow_metrics: args.sflow_metrics.then(|| SflowMetricsOptions {
                expiry: (args.sflow_metrics_expiry).unwrap_or(crate::sflow_metrics::DEFAULT_EXPIRY),
                max_series: (args.sflow_metrics_max_series)
                    .unwrap_or(crate::sflow_metrics::DEFAULT_MAX_SERIES),
            }),
            enroll: match (args.enroll_listen, args.enroll_issuer) {
                (Some(listen), Some(issuer)) => Some(EnrollOptions {
                    listen,
                    issuer,
                    validity: args
                        .enroll_validity
                        .unwrap_or(DEFAULT_ENROLL_VALIDITY)
                        .max(Duration::from_secs(60)),
                }),
                (Some(_), None) => return Err(ConfigError::Missing("enroll-issuer")),
                (None, _) => None,
            },
            quic: args.daemon.quic,
            grpc: args.daemon.grpc,
            observe: args.daemon.observe,
            reload: args.daemon.reload,
            threads: args.daemon.threads,
        })
    }
}

impl runtime::cli::DaemonArgs for Args {
    fn daemon(&self) -> &DaemonOptions {
        &self.daemon
    }

    fn recv_buffer(&self) -> usize {
        self.recv_buffer.unwrap_or(DEFAULT_RECV_BUFFER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "ca = \"c\"\ncert = \"s\"\nkey = \"k\"\nforward = [\"127.0.0.1:6343\"]\n";

    #[test]
    fn shared_daemon_options_and_durations_from_a_file() {
        let file = format!(
            "{BASE}log-format = \"json\"\nidle-timeout = \"1m\"\ngrpc-keep-alive-timeout = \"500ms\"\nworker-threads = 2\nshutdown-grace = \"10s\"\nframe-timeout = \"2s\"\n"
        );
        let args: Args = toml::from_str(&file).unwrap();
        assert_eq!(
            args.daemon.log_format(),
            runtime::telemetry::LogFormat::Json
        );
        let config = Config::try_from(args).unwrap();
        assert_eq!(config.quic.idle_timeout, Some(Duration::from_secs(60)));
        // Floored at one second, as before.
        assert_eq!(config.grpc.keep_alive_timeout(), Duration::from_secs(1));
        assert_eq!(config.threads.workers(), 2);
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
        assert_eq!(config.frame_timeout, Duration::from_secs(2));
    }

    #[test]
    fn mistakes_are_said_as_before() {
        let check = |extra: &str, want: &str| {
            let args: Args = toml::from_str(&format!("{BASE}{extra}")).unwrap();
            let err = Config::try_from(args).unwrap_err().to_string();
            assert_eq!(err, want);
        };
        check(
            "max-frame-bytes = 1000\n",
            "--max-frame-bytes 1000 is too small: a frame must hold the largest datagram (65507 bytes)",
        );
        let args: Args = toml::from_str("forward = [\"nowhere\"]\n").unwrap();
        assert_eq!(
            Config::try_from(args).unwrap_err().to_string(),
            "--forward \"nowhere\" is not HOST:PORT"
        );
        let args: Args = toml::from_str("forward = [\"127.0.0.1:1\"]\n").unwrap();
        assert_eq!(
            Config::try_from(args).unwrap_err().to_string(),
            "--ca is required (see `relay-sink --help`)"
        );
        let err = Args::try_parse_from(["relay-sink", "--grpc-listen=nope"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("\"nope\" is neither an address (IP:PORT) nor `off`"),
            "{err}"
        );
        let args: Args = toml::from_str(&format!("{BASE}grpc-listen = \"off\"\n")).unwrap();
        assert_eq!(Config::try_from(args).unwrap().grpc_listen, None);
    }
}
