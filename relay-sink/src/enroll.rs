//! Enrollment (`--enroll-listen`, `--enroll-issuer`): agents obtain their certificate with a
//! one-time token and a signing request made at the site, so their private key never leaves
//! it, and renew it with the certificate they hold.
//!
//! - A TCP port of its own, TLS 1.3 with the sink's certificate chain and the root appended
//!   (`certs::enroll_tls`), client certificates optional; the relay ports stay mutual-TLS only.
//!   Connections are bounded ([`MAX_CONNECTIONS`]) and handshakes timed out like the relay's.
//! - gRPC service `sflow_relay.enroll.v1.Enrollment` ([`service`]): `Enroll` checks the token
//!   and the request and signs with the issuing CA ([`issuer`]); `Renew` signs a request for
//!   the name of the valid, unrevoked, allowed certificate the caller presented.
//! - Requests are rate-limited per source address ([`limit`]).
//! - Every decision is a security event: one JSON log line (`security_event="enrollment"`,
//!   refusals rate-limited) and `relay_sink_enrollments_total{call,outcome}`.

pub(crate) mod issuer;
pub(crate) mod limit;
mod service;

use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use runtime::reload::Swap;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;

pub(crate) use service::Enrollments;

/// Connections open at once on the enrollment port, handshakes included.
const MAX_CONNECTIONS: usize = 256;

/// Calls in progress at once on one connection (an agent makes one).
const MAX_CALLS_PER_CONNECTION: u32 = 16;

/// The largest request accepted: a token and a signing request are a few kilobytes.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// A connection is closed after this long, whatever it does: a call takes milliseconds.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves enrollment on `listener` until `token` is cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<Swap<rustls::ServerConfig>>,
    enrollments: Arc<Enrollments>,
    handshake_timeout: Duration,
    token: CancellationToken,
) {
    let (connections, incoming) = mpsc::channel::<CallerIo>(64);
    let handshakes = TaskTracker::new();
    let accept = tokio::spawn(accept(
        listener,
        tls,
        connections,
        handshake_timeout,
        token.clone(),
        handshakes.clone(),
    ));
    let service = proto::enroll_pb::enrollment_server::EnrollmentServer::new(
        service::Service::new(enrollments),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CALLS_PER_CONNECTION)
        .timeout(Duration::from_secs(10))
        .serve_with_incoming_shutdown(
            service,
            tokio_stream::StreamExt::map(ReceiverStream::new(incoming), Ok::<_, std::io::Error>),
            token.cancelled(),
        )
        .await;
    if let Err(error) = served {
        tracing::error!(error = %runtime::grpc::error_chain(&error), "enrollment server failed");
    }
    let _ = accept.await;
    handshakes.close();
    handshakes.wait().await;
}

/// Accepts TCP connections and handshakes each in a task of its own.
async fn accept(
    listener: TcpListener,
    tls: Arc<Swap<rustls::ServerConfig>>,
    connections: mpsc::Sender<CallerIo>,
    handshake_timeout: Duration,
    token: CancellationToken,
    handshakes: TaskTracker,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let full = runtime::ratelimit::RateLimit::new(Duration::from_secs(60));
    runtime::grpc::accept_until(&listener, &token, "enroll", |tcp, remote| {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            if let Some(more) = full.check() {
                tracing::warn!(%remote, limit = MAX_CONNECTIONS, earlier_not_logged = more, "enrollment port: too many connections, closing a new one");
            }
            return;
        };
        let acceptor = TlsAcceptor::from(tls.get());
        handshakes.spawn(handshake(
            tcp,
            remote,
            slot,
            acceptor,
            handshake_timeout,
            connections.clone(),
            token.clone(),
        ));
    })
    .await;
}

/// Handshakes one connection (within `timeout`) and hands it to the server with its caller.
async fn handshake(
    tcp: TcpStream,
    remote: SocketAddr,
    slot: tokio::sync::OwnedSemaphorePermit,
    acceptor: TlsAcceptor,
    timeout: Duration,
    connections: mpsc::Sender<CallerIo>,
    token: CancellationToken,
) {
    let tls = tokio::select! {
        result = tokio::time::timeout(timeout, acceptor.accept(tcp)) => match result {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                tracing::debug!(%remote, %error, "enrollment port: TLS handshake failed");
                return;
            }
            Err(_) => return,
        },
        () = token.cancelled() => return,
    };
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
    let io = CallerIo {
        tls,
        _slot: slot,
        caller: Caller {
            remote,
            chain: chain.map(Arc::new),
        },
        deadline: Box::pin(tokio::time::sleep(CONNECTION_LIFETIME)),
    };
    let _ = connections.send(io).await;
}

/// Who called: where from, and the certificate chain presented, if any (verified by the
/// handshake against the CA file and the CRLs).
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) remote: SocketAddr,
    pub(crate) chain: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// A connection on the enrollment port, closed at [`CONNECTION_LIFETIME`].
struct CallerIo {
    tls: TlsStream<TcpStream>,
    _slot: tokio::sync::OwnedSemaphorePermit,
    caller: Caller,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl CallerIo {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn lifetime_over() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "enrollment connection open too long",
    )
}

impl Connected for CallerIo {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for CallerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Err(lifetime_over()));
        }
        Pin::new(&mut this.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for CallerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Err(lifetime_over()));
        }
        Pin::new(&mut this.tls).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}
