//! One test per [`FailureKind`], each failure made the way it happens in service: real QUIC
//! handshakes and gRPC connections on loopback against a sink end built here from the same
//! TLS policy (`relay-certs`), a silent UDP port, a closed TCP port, an address that does not
//! resolve. Each checks the `reason` label the failure is counted under and what the log says.

use std::net::{SocketAddr, TcpListener, UdpSocket};

use certs::{Ca, Identity, Issued, Leaf, Role, TrustAnchors};
use tokio_rustls::TlsAcceptor;

use super::error::Untrusted;
use super::*;
use crate::metrics::ConnectFailure;

/// A CA, a sink certificate for `localhost`, and two agent certificates: one from the CA, one
/// from another CA the sink does not know.
struct Pki {
    ca: Ca,
    foreign_ca: Ca,
    sink: Issued,
    agent: Issued,
    foreign_agent: Issued,
}

impl Pki {
    fn new() -> Self {
        let ca = Ca::generate("relay test CA", 1).expect("a CA");
        let foreign_ca = Ca::generate("another CA", 1).expect("a CA");
        let issue =
            |ca: &Ca, role, name: &str| ca.issue(&Leaf::new(role, name, 1)).expect("a certificate");
        Self {
            sink: issue(&ca, Role::Sink, "localhost"),
            agent: issue(&ca, Role::Agent, "site-a"),
            foreign_agent: issue(&foreign_ca, Role::Agent, "site-b"),
            ca,
            foreign_ca,
        }
    }

    fn anchors(ca: &Ca) -> TrustAnchors {
        TrustAnchors::from_pem(ca.cert_pem(), "ca.pem").expect("a CA certificate")
    }

    fn identity(issued: &Issued) -> Identity {
        Identity::from_pem(&issued.cert_pem, &issued.key_pem, "cert.pem", "key.pem")
            .expect("a certificate and its key")
    }

    /// An agent's credentials: its certificate, and the CA it checks the sink against.
    fn credentials(agent: &Issued, trusts: &Ca) -> Arc<Credentials> {
        let loaded = certs::Loaded {
            ca: Self::anchors(trusts),
            identity: Self::identity(agent),
        };
        let transport = Arc::new(quinn::TransportConfig::default());
        Arc::new(Credentials::new(&loaded, &transport).expect("client configurations"))
    }

    /// The sink's TLS configuration, offering `alpn`.
    fn sink_tls(&self, alpn: &[&[u8]]) -> tokio_rustls::rustls::ServerConfig {
        certs::server_config(&Self::anchors(&self.ca), &Self::identity(&self.sink), alpn)
            .expect("a server configuration")
    }
}

fn sink_at(addr: SocketAddr, server_name: &str, transport: TransportMode) -> SinkConfig {
    SinkConfig {
        addr: addr.to_string(),
        server_name: server_name.into(),
        ca: "ca.pem".into(),
        cert: "agent.pem".into(),
        key: "agent.key".into(),
        backlog_bytes: 1 << 20,
        transport,
        route: runtime::route::Route::default(),
    }
}

/// A QUIC sink on loopback that hands each connection it accepts to `then`.
fn quic_sink(pki: &Pki, then: fn(quinn::Connection)) -> SocketAddr {
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(pki.sink_tls(proto::RELAY_ALPNS))
            .expect("a QUIC server configuration");
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("an address"))
        .expect("a QUIC endpoint");
    let addr = endpoint.local_addr().expect("bound");
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            if let Ok(connection) = incoming.await {
                then(connection);
            }
        }
    });
    addr
}

/// A TLS sink on loopback (gRPC's ALPN) that does the handshake and no more: enough to be
/// refused by, or to refuse.
async fn tls_sink(pki: &Pki) -> SocketAddr {
    let acceptor = TlsAcceptor::from(Arc::new(pki.sink_tls(&[proto::GRPC_ALPN])));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a TCP port");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            // A refused handshake: the sink sends its alert and closes.
            let _ = acceptor.accept(tcp).await;
        }
    });
    addr
}

fn quic_connector(sink: SinkConfig, tls: Arc<Credentials>) -> quic::Connector {
    quic::Connector {
        endpoint: quinn::Endpoint::client("127.0.0.1:0".parse().expect("an address"))
            .expect("a QUIC endpoint"),
        tls,
        sink,
        metrics: Arc::default(),
    }
}

/// Why the first session `dial` opens fails: the attempt's error or, when the handshake
/// completed on our side first (TLS 1.3 lets it), why the session then broke.
async fn failure_of(dial: &dyn Dial, timeout: Duration) -> TransportError {
    match dial.connect(timeout).await {
        Err(error) => error,
        Ok(session) => session.wire.broken().await,
    }
}

#[tokio::test]
async fn the_sink_refusing_our_certificate_is_refused_by_sink() {
    let pki = Pki::new();
    let addr = quic_sink(&pki, drop);
    let sink = sink_at(addr, "localhost", TransportMode::Quic);
    let quic = quic_connector(sink, Pki::credentials(&pki.foreign_agent, &pki.ca));
    let error = failure_of(&quic, Duration::from_secs(5)).await;
    assert_eq!(error.kind(), FailureKind::RefusedBySink, "{error}");
    assert_eq!(error.kind().label(), ConnectFailure::Refused);
    assert!(
        error.to_string().starts_with(
            "the sink refused this agent's certificate or the handshake: aborted by peer"
        ),
        "{error}"
    );
    assert_eq!(error.sink(), addr.to_string());
    assert_eq!(error.transport(), "quic");
}

#[tokio::test]
async fn the_sink_refusing_our_certificate_over_grpc_is_refused_by_sink() {
    let pki = Pki::new();
    let addr = tls_sink(&pki).await;
    let sink = sink_at(addr, "localhost", TransportMode::Grpc);
    let tls = Pki::credentials(&pki.foreign_agent, &pki.ca);
    let grpc = grpc::Connector::new(sink, tls, Default::default()).expect("a connector");
    let error = failure_of(&grpc, Duration::from_secs(5)).await;
    assert_eq!(error.kind(), FailureKind::RefusedBySink, "{error}");
    assert_eq!(error.kind().label(), ConnectFailure::Refused);
    assert!(
        error
            .to_string()
            .starts_with("the sink refused this agent's certificate or the handshake: "),
        "{error}"
    );
    assert_eq!(error.transport(), "grpc");
}

#[tokio::test]
async fn a_sink_certificate_we_do_not_trust_is_untrusted_sink_with_advice() {
    let pki = Pki::new();
    let addr = quic_sink(&pki, drop);

    // Signed by a CA this agent does not check against.
    let sink = sink_at(addr, "localhost", TransportMode::Quic);
    let quic = quic_connector(sink, Pki::credentials(&pki.agent, &pki.foreign_ca));
    let error = failure_of(&quic, Duration::from_secs(5)).await;
    assert_eq!(
        error.kind(),
        FailureKind::UntrustedSink(Untrusted::Issuer),
        "{error}"
    );
    assert_eq!(error.kind().label(), ConnectFailure::UntrustedSink);
    assert!(
        error
            .to_string()
            .starts_with("the sink's certificate is not signed by the CA in ca.pem ("),
        "{error}"
    );

    // Not valid for the name the agent expects.
    let sink = sink_at(addr, "other.example.com", TransportMode::Quic);
    let quic = quic_connector(sink, Pki::credentials(&pki.agent, &pki.ca));
    let error = failure_of(&quic, Duration::from_secs(5)).await;
    assert_eq!(
        error.kind(),
        FailureKind::UntrustedSink(Untrusted::Name),
        "{error}"
    );
    assert_eq!(error.kind().label(), ConnectFailure::UntrustedSink);
    assert!(
        error.to_string().contains(
            "not valid for the name \"other.example.com\": set --server-name to a name in its certificate"
        ),
        "{error}"
    );

    // The same over gRPC, where rustls's error comes through tonic and hyper.
    let addr = tls_sink(&pki).await;
    let sink = sink_at(addr, "other.example.com", TransportMode::Grpc);
    let tls = Pki::credentials(&pki.agent, &pki.ca);
    let grpc = grpc::Connector::new(sink, tls, Default::default()).expect("a connector");
    let error = failure_of(&grpc, Duration::from_secs(5)).await;
    assert_eq!(
        error.kind(),
        FailureKind::UntrustedSink(Untrusted::Name),
        "{error}"
    );
    assert!(error.to_string().contains("set --server-name"), "{error}");
}

#[tokio::test]
async fn no_handshake_in_time_is_a_timeout() {
    let pki = Pki::new();
    // A UDP port that takes packets and never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
    let addr = silent.local_addr().expect("bound");
    let sink = sink_at(addr, "localhost", TransportMode::Quic);
    let quic = quic_connector(sink, Pki::credentials(&pki.agent, &pki.ca));
    let error = failure_of(&quic, Duration::from_millis(200)).await;
    assert_eq!(error.kind(), FailureKind::Timeout, "{error}");
    assert_eq!(error.kind().label(), ConnectFailure::Timeout);
    assert_eq!(
        error.to_string(),
        format!("no QUIC handshake with {addr} within 200ms")
    );
}

#[tokio::test]
async fn nothing_listening_is_unreachable() {
    let pki = Pki::new();
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a TCP port");
    // The listener is gone: the port refuses connections.
    let sink = sink_at(addr, "localhost", TransportMode::Grpc);
    let grpc = grpc::Connector::new(
        sink,
        Pki::credentials(&pki.agent, &pki.ca),
        Default::default(),
    )
    .expect("a connector");
    let error = failure_of(&grpc, Duration::from_secs(5)).await;
    assert_eq!(error.kind(), FailureKind::Unreachable, "{error}");
    assert_eq!(error.kind().label(), ConnectFailure::Unreachable);
    assert!(error.to_string().contains("refused"), "{error}");
}

#[tokio::test]
async fn the_sink_closing_the_connection_is_protocol() {
    let pki = Pki::new();
    let addr = quic_sink(&pki, |connection| {
        connection.close(quinn::VarInt::from_u32(1), b"frame too large");
    });
    let sink = sink_at(addr, "localhost", TransportMode::Quic);
    let quic = quic_connector(sink, Pki::credentials(&pki.agent, &pki.ca));
    let error = failure_of(&quic, Duration::from_secs(5)).await;
    assert_eq!(error.kind(), FailureKind::Protocol, "{error}");
    assert_eq!(error.kind().label(), ConnectFailure::Other);
    assert!(error.to_string().contains("frame too large"), "{error}");
    let source = std::error::Error::source(&error)
        .and_then(|source| source.downcast_ref::<quinn::ConnectionError>());
    assert!(
        matches!(source, Some(quinn::ConnectionError::ApplicationClosed(_))),
        "the typed cause is kept: {source:?}"
    );
}

#[tokio::test]
async fn an_address_that_does_not_resolve_is_other() {
    let pki = Pki::new();
    let mut sink = sink_at(
        "127.0.0.1:1".parse().expect("an address"),
        "localhost",
        TransportMode::Quic,
    );
    sink.addr = "no-port-here".into();
    let quic = quic_connector(sink, Pki::credentials(&pki.agent, &pki.ca));
    let error = failure_of(&quic, Duration::from_secs(5)).await;
    assert_eq!(error.kind(), FailureKind::Other, "{error}");
    assert_eq!(error.kind().label(), ConnectFailure::Other);
    assert!(
        error
            .to_string()
            .starts_with("cannot resolve no-port-here: "),
        "{error}"
    );
}

#[tokio::test]
async fn with_auto_the_grpc_attempt_decides_and_both_are_told() {
    let pki = Pki::new();
    let silent = UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a TCP port");
    let udp = silent.local_addr().expect("bound");
    // The QUIC attempt times out (a silent UDP port), then the gRPC one is refused (a
    // closed TCP port).
    let tls = Pki::credentials(&pki.agent, &pki.ca);
    let dialer = Dialer {
        sink: sink_at(closed, "localhost", TransportMode::Auto),
        quic: Arc::new(quic_connector(
            sink_at(udp, "localhost", TransportMode::Auto),
            tls.clone(),
        )),
        grpc: Arc::new(
            grpc::Connector::new(
                sink_at(closed, "localhost", TransportMode::Auto),
                tls,
                Default::default(),
            )
            .expect("a connector"),
        ),
        metrics: Arc::default(),
        connect_timeout: Duration::from_secs(5),
        quic_fallback_after: Duration::from_millis(200),
        quic_retry_interval: Duration::from_secs(60),
    };
    let Err(error) = dialer.connect().await else {
        panic!("connected to nothing");
    };
    assert_eq!(error.kind(), FailureKind::Unreachable, "{error}");
    assert_eq!(error.transport(), "auto");
    let text = error.to_string();
    assert!(
        text.starts_with(&format!(
            "QUIC: no QUIC handshake with {udp} within 200ms; gRPC: "
        )),
        "{text}"
    );
}
