//! relay-sink: the cloud end of sflow-relay.
//!
//! Accepts relay agents over QUIC, and over gRPC (HTTP/2 over TLS on TCP) on the same port
//! number, both with mutual TLS (only certificates signed by the configured CA, with the
//! clientAuth usage); reads their batches, replays every datagram byte for byte as UDP to each
//! destination, and acknowledges each batch to its agent.
//!
//! # Layout
//!
//! Modules by layer, lowest first; each imports only from the layers below it (and the
//! connection layer reads the root's `Shared`), so there are no import circles:
//!
//! 1. Leaves, importing nothing from the crate:
//!    - [`config`] — command-line and file options, and the checked [`Config`].
//!    - `labels`: the fixed label values of metrics and the security log (transport, refusal
//!      kind, protocol violation).
//!    - `catch_up`: pacing what agents send to catch up.
//! 2. Counting and policy:
//!    - [`metrics`] — Prometheus counters and gauges (labels from `labels`, `catch_up`).
//!    - `authz`: who may connect beyond "signed by our CA" (allow-list, CRL).
//! 3. State the connections share:
//!    - [`replay`] — per-destination UDP senders with bounded queues, and the matching of each
//!      batch against the destinations' routes before them (its start-up errors are the
//!      root's [`Error`]).
//!    - `status`: the connected agents (`/agents`, the per-identity limit), readiness, values
//!      refreshed at each scrape.
//! 4. Per-agent bookkeeping:
//!    - `dedup`: the last batch replayed per agent session, to drop resends.
//!    - `limits`: `--max-datagram-bytes` and `--agent-max-pps` per agent.
//! 5. Connections, reading `Shared`:
//!    - `refusal`: typed handshake and protocol errors, counted by kind and logged
//!      (rate-limited per kind).
//!    - `admission`: letting an authenticated agent in (authorization, connection limits), and
//!      closing those a reload no longer authorizes.
//!    - `ingress`: the path of a batch to replay that both transports share, and the
//!      transports (`ingress::quic`, `ingress::grpc`).
//!    - `reload`: the TLS configurations, and their reload with the certificate and
//!      authorization files (closing, through `admission`, what a new policy refuses); and
//!      the reload of the destinations' routes from the config file.
//! 6. This root: [`bind`], [`run`] and `Shared`, which wires the layers together.
//!
//! [`run`] takes sockets bound by [`bind`] and a shutdown future, so tests and the demo can
//! drive it without a process of its own.

mod admission;
mod authz;
mod catch_up;
pub mod config;
mod dedup;
mod enroll;
mod ingress;
mod labels;
mod limits;
pub mod metrics;
mod refusal;
mod reload;
pub mod replay;
mod sflow_metrics;
mod status;

use std::future::Future;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

pub use config::{Args, Config};
pub use metrics::Metrics;
use reload::Tls;
use replay::Replay;
use runtime::reload::Swap;
use rustls::pki_types::pem::PemObject as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Errors that stop the sink from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Certificates or keys could not be loaded, or do not fit together.
    #[error(transparent)]
    Certs(#[from] certs::Error),
    /// The QUIC endpoint could not be set up.
    #[error("cannot start QUIC on {0}: {1}")]
    Quic(SocketAddr, String),
    /// The gRPC listener could not be set up.
    #[error("cannot start gRPC on {0}: {1}")]
    Grpc(SocketAddr, String),
    /// A replay destination could not be set up.
    #[error("replay destination {0}: {1}")]
    Destination(String, String),
    /// The allow-list or revocation list could not be loaded.
    #[error("agent authorization: {0}")]
    Policy(String),
    /// The metrics endpoint could not be started.
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    /// Enrollment could not be set up (the issuing CA folder, or the port).
    #[error("enrollment (--enroll-listen): {0}")]
    Enroll(String),
}

/// What the connection tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    config: Config,
    replay: Replay,
    metrics: Arc<Metrics>,
    /// Refusal logging, limited per kind of refusal (so a flood of one kind cannot hide
    /// another).
    refusals: refusal::Refusals,
    /// What each agent session has had replayed, to drop resends.
    replayed: dedup::Replayed,
    /// The agent connections open now.
    agents: Arc<status::Agents>,
    /// Slots for agent connections (`--max-connections`), handshakes in progress included.
    slots: Arc<tokio::sync::Semaphore>,
    /// Logging of connections refused over a limit: at most one line a second.
    limits_log: runtime::ratelimit::RateLimit,
    /// `--max-datagram-bytes` and `--agent-max-pps`.
    paces: limits::Paces,
    /// The catch-up pace (`--catch-up-max-pps`).
    catch_up: catch_up::CatchUp,
    /// The allow-list and revocation list in force (swapped on reload).
    policy: Swap<authz::Policy>,
    /// The sFlow interface counters (`--sflow-metrics`), when on.
    sflow_metrics: Option<Arc<sflow_metrics::SflowMetrics>>,
}

/// The sink's bound sockets.
#[derive(Debug)]
pub struct Listeners {
    /// QUIC (UDP).
    pub quic: UdpSocket,
    /// gRPC (TCP), unless turned off.
    pub grpc: Option<TcpListener>,
    /// The metrics endpoint (TCP), when `--metrics-listen` is set.
    pub metrics: Option<TcpListener>,
    /// The enrollment port (TCP), when `--enroll-listen` is set.
    pub enroll: Option<TcpListener>,
}

/// Why the sink could not bind its sockets; each names the address.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The QUIC socket.
    #[error("cannot listen on {0} (UDP): {1}")]
    Udp(SocketAddr, #[source] std::io::Error),
    /// The gRPC listener.
    #[error("cannot listen on {0} (TCP): {1}")]
    Tcp(SocketAddr, #[source] std::io::Error),
    /// The metrics endpoint (`--metrics-listen`).
    #[error("{0}")]
    Metrics(String),
}

/// Binds the QUIC socket (with the configured buffers) and the gRPC listener.
///
/// When both ask for the same address with port 0, they get the same port number: the UDP
/// port is picked first, and picked again should that number be taken on TCP.
///
/// # Errors
///
/// When an address cannot be bound; the error names it.
pub fn bind(config: &Config) -> Result<Listeners, BindError> {
    let metrics = runtime::observe::bind(&config.observe).map_err(BindError::Metrics)?;
    let (quic, grpc) = bind_relay(config)?;
    let enroll = config
        .enroll
        .as_ref()
        .map(|e| TcpListener::bind(e.listen).map_err(|error| BindError::Tcp(e.listen, error)))
        .transpose()?;
    Ok(Listeners {
        quic,
        grpc,
        metrics,
        enroll,
    })
}

fn bind_relay(config: &Config) -> Result<(UdpSocket, Option<TcpListener>), BindError> {
    let buffers = runtime::udp::Buffers {
        recv: Some(config.recv_buffer),
        send: Some(config.recv_buffer),
    };
    let quic =
        |addr: SocketAddr| runtime::udp::bind(addr, buffers).map_err(|e| BindError::Udp(addr, e));
    let grpc = |addr: SocketAddr| TcpListener::bind(addr).map_err(|e| BindError::Tcp(addr, e));
    match config.grpc_listen {
        None => Ok((quic(config.listen)?, None)),
        Some(tcp) if tcp == config.listen && tcp.port() == 0 => {
            let mut last = None;
            for _ in 0..32 {
                let udp = quic(config.listen)?;
                let port = udp
                    .local_addr()
                    .map_err(|e| BindError::Udp(config.listen, e))?
                    .port();
                match grpc(SocketAddr::new(tcp.ip(), port)) {
                    Ok(listener) => return Ok((udp, Some(listener))),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.expect("32 attempts"))
        }
        Some(tcp) => Ok((quic(config.listen)?, Some(grpc(tcp)?))),
    }
}

/// Runs the sink on `listeners` until `shutdown` resolves, then stops accepting, closes agent
/// connections and finishes replaying what was received (within `shutdown_grace`).
///
/// # Errors
///
/// When certificates cannot be loaded or a destination cannot be set up.
pub async fn run(
    config: Config,
    listeners: Listeners,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let (reloader, loaded) = open_certificates(&config)?;
    let identity = loaded.identity.clone();
    let (policy_files, policy) = load_policy(&config)?;
    let transport = Arc::new(config.quic.transport_config());
    let socket = listeners.quic;
    let local = socket
        .local_addr()
        .map_err(|e| Error::Quic(config.listen, e.to_string()))?;
    let grpc_listener = listeners
        .grpc
        .map(|l| grpc_listener(l, local))
        .transpose()?;
    let tls = Tls::build(&loaded, &transport, &policy.revocation)
        .map_err(|e| Error::Quic(local, e.to_string()))?;
    let grpc_tls = Arc::new(Swap::new(tls.grpc));
    let endpoint = server_endpoint(socket, tls.quic, &config.key, local)?;
    let mut replay_tasks = JoinSet::new();
    let replay = start_replay(&config, &metrics, &mut replay_tasks).await?;
    let (grace, reload_interval) = (config.shutdown_grace, config.reload.interval());
    let forward_reload = config.forward_file.clone().map(|file| {
        let started = config.forward.iter().map(|f| f.addr.clone()).collect();
        reload::forward::ForwardReload::new(file, started, replay.states())
    });
    let sflow_metrics = sflow_metrics(&config, &metrics);
    let status = Arc::new(status::SinkStatus {
        metrics: metrics.clone(),
        agents: Arc::new(status::Agents::new(metrics.clone())),
        ready: AtomicBool::new(false),
        certificate_not_after: AtomicI64::new(identity.info().not_after.unix_timestamp()),
        destinations: replay.states(),
        sflow_metrics: sflow_metrics.clone(),
    });
    let shared = share(
        config,
        replay,
        &metrics,
        policy,
        status.agents.clone(),
        sflow_metrics,
    );
    let grpc_addr = grpc_listener.as_ref().map(|(_, addr)| *addr);
    log_listening(local, grpc_addr, &identity);
    let enrollment = listeners
        .enroll
        .map(|listener| start_enrollment(listener, &loaded, &shared))
        .transpose()?;

    let (token, tracker) = (CancellationToken::new(), TaskTracker::new());
    // Served until the very end, so a scrape during the drain still answers.
    let observing = CancellationToken::new();
    let _ = listeners
        .metrics
        .map(|listener| runtime::observe::spawn(listener, status.clone(), observing.clone()))
        .transpose()
        .map_err(|e| Error::Metrics(e.to_string()))?;
    let accept = tokio::spawn(ingress::quic::serve(
        endpoint.clone(),
        shared.clone(),
        token.clone(),
        tracker.clone(),
    ));
    let grpc = grpc_listener.map(|(listener, _)| {
        let serve = ingress::grpc::serve(listener, grpc_tls.clone(), shared.clone(), token.clone());
        tracker.spawn(serve)
    });
    let enroll_tls = enrollment.map(|(listener, tls, enrollments)| {
        let timeout = shared.config.handshake_timeout;
        tracker.spawn(enroll::serve(
            listener,
            tls.clone(),
            enrollments.clone(),
            timeout,
            token.clone(),
        ));
        reload::EnrollTls {
            swap: tls,
            root: enrollments.issuer().root().clone(),
        }
    });
    let reload = reload::SinkReload {
        reloader,
        policy_files,
        current: loaded,
        transport,
        endpoint: endpoint.clone(),
        grpc_tls,
        status: status.clone(),
        shared: shared.clone(),
        forward: forward_reload,
        enroll_tls,
    };
    let reloading = runtime::reload::spawn(reload_interval, token.clone(), reload)
        .map_err(|e| Error::Quic(local, format!("cannot handle SIGHUP: {e}")))?;
    status.ready.store(true, Ordering::Relaxed);
    shutdown.await;
    status.ready.store(false, Ordering::Relaxed);
    token.cancel();
    let _ = accept.await;
    let _ = reloading.await;
    drop(grpc);
    drain(tracker, shared, replay_tasks, &endpoint, grace).await;
    log_summary(&metrics);
    observing.cancel();
    Ok(())
}

/// Says where the sink listens, and as whom.
fn log_listening(local: SocketAddr, grpc: Option<SocketAddr>, identity: &certs::Identity) {
    tracing::info!(
        listen = %local,
        grpc_listen = grpc.map_or_else(|| "off".into(), |addr| addr.to_string()),
        identity = identity.name(),
        expires_in_days = identity.info().seconds_to_expiry() / 86_400,
        "sink listening for agents (mutual TLS)"
    );
}

/// What enrollment runs with: its listener, its TLS configuration (swapped on reload), and
/// its state.
type Enrollment = (
    tokio::net::TcpListener,
    Arc<Swap<rustls::ServerConfig>>,
    Arc<enroll::Enrollments>,
);

/// Opens the issuing CA folder and sets up the enrollment port on `listener`.
fn start_enrollment(
    listener: TcpListener,
    loaded: &certs::Loaded,
    shared: &Arc<Shared>,
) -> Result<Enrollment, Error> {
    let options = shared
        .config
        .enroll
        .as_ref()
        .ok_or_else(|| Error::Enroll("no --enroll-issuer".into()))?;
    let issuer =
        enroll::issuer::Issuer::open(&options.issuer, options.validity).map_err(Error::Enroll)?;
    // Agents that enroll trust this root alone: the sink's own certificate must lead to it.
    let root = certs::TrustAnchors::from_pem(issuer.root_pem(), "the issuer's ca.pem")?;
    certs::check_chain(&root, &loaded.identity, certs::Role::Sink).map_err(|e| {
        Error::Enroll(format!(
            "this sink's certificate is not under the root CA of {} ({e}): agents that enroll would refuse it",
            options.issuer.display()
        ))
    })?;
    // And the agents it enrolls must get in: --ca must hold that root.
    let ca_file = std::fs::read(&shared.config.ca).unwrap_or_default();
    let root_fingerprint = certs::token::fingerprint(issuer.root());
    let trusted = rustls::pki_types::CertificateDer::pem_slice_iter(&ca_file)
        .flatten()
        .any(|ca| certs::token::fingerprint(&ca) == root_fingerprint);
    if !trusted {
        return Err(Error::Enroll(format!(
            "--ca {} does not hold the root CA of {}: the agents it enrolls could not connect",
            shared.config.ca.display(),
            options.issuer.display()
        )));
    }
    let tls =
        certs::enroll_tls::enrollment_server_config(&loaded.ca, issuer.root(), &loaded.identity)?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Enroll(e.to_string()))?;
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
        .map_err(|e| Error::Enroll(format!("{addr}: {e}")))?;
    tracing::info!(
        enroll_listen = %addr,
        issuer = issuer.name(),
        validity = ?options.validity,
        "serving enrollment (one-time tokens, renewal)"
    );
    let enrollments = enroll::Enrollments::new(issuer, shared.clone(), shared.metrics.registry());
    Ok((listener, Arc::new(Swap::new(tls)), Arc::new(enrollments)))
}

/// Opens the sink's certificate files: the reloader that watches them, and what they hold.
fn open_certificates(config: &Config) -> Result<(certs::Reloader, certs::Loaded), Error> {
    let files = certs::TlsFiles {
        ca: config.ca.clone(),
        cert: config.cert.clone(),
        key: config.key.clone(),
    };
    let (reloader, loaded, chained) = certs::Reloader::open(files, certs::Role::Sink)?;
    if !chained {
        tracing::info!(cert = %config.cert.display(), ca = %config.ca.display(), "the sink's certificate is not issued by the CA it checks agents against; reloads will not check its chain");
    }
    Ok((reloader, loaded))
}

/// Reads the allow-list and CRL files, if any: the files (to check again on reload) and the
/// policy they make.
fn load_policy(config: &Config) -> Result<(authz::PolicyFiles, authz::Policy), Error> {
    let mut files = authz::PolicyFiles::new(
        config.ca.clone(),
        config.crl.clone(),
        config.allowed_agents.clone(),
    );
    let policy = files
        .check(true)
        .map_err(|e| Error::Policy(e.to_string()))?
        .unwrap_or_default();
    if files.any() {
        tracing::info!(
            revoked = policy.revocation.len(),
            allowed_agents = policy
                .allowed_count()
                .map_or_else(|| "any".into(), |n| n.to_string()),
            "agent authorization loaded"
        );
    }
    Ok((files, policy))
}

/// The gRPC listener, registered with the runtime, and its address.
fn grpc_listener(
    listener: TcpListener,
    local: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), Error> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Grpc(local, e.to_string()))?;
    listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
        .map(|l| (l, addr))
        .map_err(|e| Error::Grpc(addr, e.to_string()))
}

/// The QUIC endpoint on `socket`. Its stateless resets are keyed by the private key's file, so
/// that a restarted sink resets its predecessor's connections at once.
fn server_endpoint(
    socket: UdpSocket,
    server: quinn::ServerConfig,
    key: &std::path::Path,
    local: SocketAddr,
) -> Result<quinn::Endpoint, Error> {
    let key_material = std::fs::read(key).unwrap_or_default();
    runtime::quic::endpoint(socket, Some(server), Some(&key_material))
        .map_err(|e| Error::Quic(local, e.to_string()))
}

/// Opens a socket per replay destination and starts its sender in `tasks`.
async fn start_replay(
    config: &Config,
    metrics: &Arc<Metrics>,
    tasks: &mut JoinSet<()>,
) -> Result<Replay, Error> {
    let pace = replay::Pace {
        max_pps: config.replay_max_pps,
        max_bps: config.replay_max_bps,
    };
    let replay = Replay::start(
        &config.forward,
        config.replay_queue,
        config.send_buffer,
        pace,
        metrics.clone(),
        tasks,
    )
    .await?;
    Ok(replay)
}

/// The sFlow interface metrics, with `--sflow-metrics` (said in the log either way when on).
fn sflow_metrics(config: &Config, metrics: &Metrics) -> Option<Arc<sflow_metrics::SflowMetrics>> {
    let options = config.sflow_metrics?;
    if config.observe.metrics_listen.is_none() {
        tracing::warn!(
            "--sflow-metrics is on but --metrics-listen is not set: /metrics/sflow is served nowhere"
        );
    }
    tracing::info!(
        expiry = ?options.expiry,
        max_series = options.max_series,
        "sFlow interface counters exported at /metrics/sflow"
    );
    Some(Arc::new(sflow_metrics::SflowMetrics::new(
        metrics.registry(),
        options.expiry,
        options.max_series,
    )))
}

/// What the connection tasks share, from the configuration and the parts set up so far.
fn share(
    config: Config,
    replay: Replay,
    metrics: &Arc<Metrics>,
    policy: authz::Policy,
    agents: Arc<status::Agents>,
    sflow_metrics: Option<Arc<sflow_metrics::SflowMetrics>>,
) -> Arc<Shared> {
    let max_connections = config.max_connections;
    let catch_up_max_pps = config.catch_up_max_pps;
    tracing::info!(
        catch_up_max_pps,
        "live traffic is replayed as it arrives; agents' catch-up traffic is paced"
    );
    Arc::new(Shared {
        config,
        replay,
        metrics: metrics.clone(),
        refusals: refusal::Refusals::default(),
        replayed: dedup::Replayed::default(),
        agents,
        slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        limits_log: runtime::ratelimit::RateLimit::new(std::time::Duration::from_secs(1)),
        paces: limits::Paces::default(),
        catch_up: catch_up::CatchUp::new(catch_up_max_pps),
        policy: Swap::new(policy),
        sflow_metrics,
    })
}

/// Waits for the connections to finish, then for the replay of what they brought, each at
/// most `grace`; then closes the QUIC endpoint.
async fn drain(
    tracker: TaskTracker,
    shared: Arc<Shared>,
    mut replay_tasks: JoinSet<()>,
    endpoint: &quinn::Endpoint,
    grace: std::time::Duration,
) {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("connections did not finish within the shutdown grace period");
    }
    // Dropping the last `Replay` closes the destination queues; their tasks drain and end.
    drop(shared);
    if tokio::time::timeout(grace, async {
        while replay_tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            "replay did not finish within the shutdown grace period; queued datagrams dropped"
        );
    }
    endpoint.close(0u32.into(), b"sink shutting down");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// Logs the sink's counters.
fn log_summary(metrics: &Metrics) {
    tracing::info!(
        datagrams_received = metrics.datagrams_received.get(),
        datagrams_replayed = metrics.datagrams_replayed(),
        datagrams_duplicate = metrics.datagrams_duplicate.get(),
        datagrams_unmatched = metrics.datagrams_unmatched.get(),
        replay_errors = metrics.replay_errors(),
        replay_queue_drops = metrics.replay_queue_drops(),
        connections_accepted = metrics.connections_accepted(),
        handshakes_refused = metrics.handshakes_refused(),
        protocol_errors = metrics.protocol_errors(),
        connections_refused = metrics.connections_refused_max.get(),
        "sink stopped"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listen: SocketAddr, grpc: Option<SocketAddr>) -> Config {
        let mut config = Config::try_from(Args {
            listen: Some(listen),
            ca: Some("ca.pem".into()),
            cert: Some("sink.pem".into()),
            key: Some("sink.key".into()),
            forward: vec!["127.0.0.1:6343".into()],
            ..Default::default()
        })
        .expect("config");
        config.grpc_listen = grpc;
        config
    }

    #[test]
    fn an_address_in_use_is_an_error_that_names_it_and_its_protocol() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let taken = udp.local_addr().unwrap();
        let error = bind(&config(taken, None)).unwrap_err();
        assert!(matches!(error, BindError::Udp(addr, _) if addr == taken));
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot listen on {taken} (UDP): ")),
            "{error}"
        );

        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = tcp.local_addr().unwrap();
        let free = SocketAddr::from(([127, 0, 0, 1], 0));
        let error = bind(&config(free, Some(taken))).unwrap_err();
        assert!(matches!(error, BindError::Tcp(addr, _) if addr == taken));
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot listen on {taken} (TCP): ")),
            "{error}"
        );
    }

    #[test]
    fn port_zero_gives_quic_and_grpc_the_same_port() {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let listeners = bind(&config(any, Some(any))).expect("bind");
        let quic = listeners.quic.local_addr().unwrap();
        let grpc = listeners.grpc.expect("gRPC listener").local_addr().unwrap();
        assert_ne!(quic.port(), 0);
        assert_eq!(quic.port(), grpc.port());
    }
}
