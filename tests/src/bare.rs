//! Bare clients for the cases the real agent cannot produce, such as connecting with no client
//! certificate at all. They speak the real protocol (ALPN, frames or gRPC) to the real sink.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use proto::pb;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::Transport;

/// Connects to `sink` over `transport` with TLS that presents no client certificate, sends
/// one batch of `datagrams`, and waits up to 3 s for its acknowledgement. `Ok` means the sink
/// accepted and acknowledged the batch; `Err` says how it was refused.
pub fn relay_without_client_cert(
    transport: Transport,
    sink: SocketAddr,
    ca: &Path,
    datagrams: &[Vec<u8>],
) -> Result<(), String> {
    relay_one_batch(transport, sink, ca, None, datagrams)
}

/// Connects to `sink` over `transport`, presenting `client` (certificate, key) when given,
/// sends all of `datagrams` as one batch, however large, and waits up to 3 s for its
/// acknowledgement. `Ok` means the sink acknowledged it; `Err` says how it was refused.
pub fn relay_one_batch(
    transport: Transport,
    sink: SocketAddr,
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    datagrams: &[Vec<u8>],
) -> Result<(), String> {
    let batch = pb::Batch {
        session: 1,
        sequence: 1,
        datagrams: datagrams
            .iter()
            .map(|d| pb::Datagram {
                payload: d.clone().into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    send_batch(transport, sink, ca, client, batch)
}

/// Connects to `sink` over `transport`, presenting `client` when given, sends `batch` as it
/// is (whatever it holds: compressed datagrams included), and waits up to 3 s for its
/// acknowledgement. `Ok` means the sink acknowledged it; `Err` says how it was refused.
pub fn send_batch(
    transport: Transport,
    sink: SocketAddr,
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    batch: pb::Batch,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let attempt = async {
            match transport {
                Transport::Quic => over_quic(sink, ca, client, batch).await,
                Transport::Grpc => over_grpc(sink, ca, client, batch).await,
            }
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(result) => result,
            Err(_) => Err("no acknowledgement within 3 s".into()),
        }
    })
}

/// A client TLS configuration for misbehaving on purpose: TLS 1.3 trusting `ca`, presenting
/// `client` when given, offering the single ALPN protocol `alpn` (which may be wrong).
///
/// # Errors
///
/// When a file cannot be read or does not fit.
pub fn client_tls(
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, String> {
    tls(ca, client, alpn)
}

/// TLS 1.3 trusting `ca`, presenting `client` when given.
fn tls(
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let mut tls = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| e.to_string())?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| e.to_string())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?
        }
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

async fn over_quic(
    sink: SocketAddr,
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    batch: pb::Batch,
) -> Result<(), String> {
    let tls = tls(ca, client, proto::ALPN)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let attempt = async {
        let connection = endpoint
            .connect(sink, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        let mut frame = bytes::BytesMut::new();
        proto::wire::encode_frame(&batch, &mut frame);
        send.write_all(&frame).await.map_err(|e| e.to_string())?;
        let mut reader = proto::wire::FrameReader::new(recv, 1024);
        match reader.next::<pb::Ack>().await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err("stream closed without an acknowledgement".to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    let result = attempt.await;
    endpoint.close(0u32.into(), b"");
    result
}

async fn over_grpc(
    sink: SocketAddr,
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    batch: pb::Batch,
) -> Result<(), String> {
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls(ca, client, proto::GRPC_ALPN)?));
    let connector = tower::service_fn(move |_| {
        let tls = tls.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(sink).await?;
            let name = ServerName::try_from("localhost").expect("valid name");
            let stream = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .map_err(|e| runtime::grpc::error_chain(&e))?;
    let mut client =
        pb::relay_client::RelayClient::new(channel).max_encoding_message_size(usize::MAX);
    let response = client
        .stream(tokio_stream::iter([batch]))
        .await
        .map_err(|s| runtime::grpc::error_chain(&s))?;
    match response.into_inner().message().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("call ended without an acknowledgement".to_string()),
        Err(s) => Err(runtime::grpc::error_chain(&s)),
    }
}

/// Makes `n` TLS handshakes with the sink's gRPC (TCP) port presenting no client certificate,
/// `parallel` at a time, each dropped once the sink has had its say: a flood of refusals.
/// Returns how long it took.
pub fn flood_without_client_cert(
    sink: SocketAddr,
    ca: &Path,
    n: usize,
    parallel: usize,
) -> Duration {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let config = Arc::new(tls(ca, None, proto::GRPC_ALPN).expect("client TLS"));
    let started = std::time::Instant::now();
    rt.block_on(async {
        let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
        let mut attempts = tokio::task::JoinSet::new();
        for _ in 0..n {
            let permit = slots.clone().acquire_owned().await.expect("semaphore");
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            attempts.spawn(async move {
                let attempt = async {
                    let tcp = tokio::net::TcpStream::connect(sink).await?;
                    let name = ServerName::try_from("localhost").expect("valid name");
                    let mut tls = connector.connect(name, tcp).await?;
                    // The sink checks the (missing) certificate after our side is done:
                    // wait for its alert or its close.
                    let mut byte = [0u8; 1];
                    tokio::io::AsyncReadExt::read(&mut tls, &mut byte).await
                };
                let _ = tokio::time::timeout(Duration::from_secs(5), attempt).await;
                drop(permit);
            });
        }
        while attempts.join_next().await.is_some() {}
    });
    started.elapsed()
}

/// What a [`OlderSink`] received: each batch as it came (its datagrams still compressed, if
/// they were), in order.
pub type Received = Arc<std::sync::Mutex<Vec<pb::Batch>>>;

/// A sink of an older release, as far as the agent can tell: a QUIC server that offers only
/// the ALPN protocols `alpns` (say `sflow-relay/1+zstd` and `sflow-relay/1`, a sink from
/// before history), reads the batches of one connection at a time, expands them as such a sink
/// could (it refuses one made against a history) and acknowledges each. For checking that a
/// new agent falls back to what an older sink reads.
pub struct OlderSink {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The batches received, as they came.
    pub received: Received,
    /// Batches that a sink of that release could not have read (the reason, each).
    pub refused: Arc<std::sync::Mutex<Vec<String>>>,
    _runtime: tokio::runtime::Runtime,
}

impl OlderSink {
    /// Listens on 127.0.0.1 with the certificate `sink` (certificate, key), trusting agents
    /// that `ca` signed.
    pub fn start(ca: &Path, sink: &(PathBuf, PathBuf), alpns: &[&[u8]]) -> Self {
        let ca = certs::TrustAnchors::load(ca).expect("the CA");
        let identity = certs::Identity::load(&sink.0, &sink.1).expect("the sink's identity");
        let tls = certs::server_config(&ca, &identity, alpns).expect("a TLS configuration");
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("QUIC TLS");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let endpoint = runtime
            .block_on(async {
                quinn::Endpoint::server(
                    quinn::ServerConfig::with_crypto(Arc::new(crypto)),
                    "127.0.0.1:0".parse().expect("an address"),
                )
            })
            .expect("a QUIC endpoint");
        let addr = endpoint.local_addr().expect("its address");
        let received = Received::default();
        let refused = Arc::<std::sync::Mutex<Vec<String>>>::default();
        let (r, f) = (received.clone(), refused.clone());
        runtime.spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Ok(connection) = incoming.await else {
                    continue;
                };
                let Ok((mut send, recv)) = connection.accept_bi().await else {
                    continue;
                };
                let mut reader =
                    proto::wire::FrameReader::new(recv, proto::wire::DEFAULT_MAX_FRAME_LEN);
                while let Ok(Some(batch)) = reader.next::<pb::Batch>().await {
                    if batch.zstd_prefix.is_some() {
                        f.lock()
                            .expect("not poisoned")
                            .push(format!("batch {} made against a history", batch.sequence));
                        break;
                    }
                    let ack = pb::Ack {
                        session: batch.session,
                        sequence: batch.sequence,
                    };
                    r.lock().expect("not poisoned").push(batch);
                    let mut frame = bytes::BytesMut::new();
                    proto::wire::encode_frame(&ack, &mut frame);
                    if send.write_all(&frame).await.is_err() {
                        break;
                    }
                }
                connection.close(0u32.into(), b"done");
            }
        });
        Self {
            addr,
            received,
            refused,
            _runtime: runtime,
        }
    }

    /// The datagrams received so far, expanded, in order.
    pub fn datagrams(&self) -> Vec<Vec<u8>> {
        let batches = self.received.lock().expect("not poisoned").clone();
        let mut expander = proto::compression::Expander::new(proto::wire::DEFAULT_MAX_FRAME_LEN);
        batches
            .into_iter()
            .flat_map(|mut batch| {
                expander
                    .expand(&mut batch)
                    .expect("a batch this sink reads");
                batch.datagrams.into_iter().map(|d| d.payload.to_vec())
            })
            .collect()
    }
}
