//! A bare QUIC client for the cases the real agent cannot produce, such as connecting with no
//! client certificate at all. It speaks the real protocol (ALPN, frames) to the real sink.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proto::pb;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Connects to `sink` with TLS that presents no client certificate, sends one batch of
/// `datagrams`, and waits up to 3 s for its acknowledgement. `Ok` means the sink accepted
/// and acknowledged the batch; `Err` says how it was refused.
pub fn relay_without_client_cert(
    sink: SocketAddr,
    ca: &Path,
    datagrams: &[Vec<u8>],
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
            roots
                .add(cert.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![proto::ALPN.to_vec()];
        let quic =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
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
            };
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
        let result = match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(result) => result,
            Err(_) => Err("no acknowledgement within 3 s".into()),
        };
        endpoint.close(0u32.into(), b"");
        result
    })
}
