//! gRPC (HTTP/2 over TLS on TCP) settings shared by agent and sink.
//!
//! The gRPC transport exists for sites whose firewalls pass TCP and nothing else. Those paths
//! are full of NATs and load balancers that forget an idle TCP flow after a few minutes (AWS
//! NLB 350 s, Azure LB 4 min, many home and corporate NATs less), so both ends send HTTP/2
//! PINGs while the link is idle, and give up on a peer that stops answering them.
//!
//! [`accept_until`] is the accept loop of the sink's gRPC ports (the relay's and enrollment's).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::duration;

/// Default HTTP/2 keep-alive interval: far below common TCP idle timers.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Default time to wait for a keep-alive answer before the connection counts as dead.
pub const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Default HTTP/2 stream window: 8 MiB, as QUIC's, about 1 Gbit/s at 64 ms RTT.
pub const DEFAULT_STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// Default HTTP/2 connection window.
pub const DEFAULT_CONN_WINDOW: u32 = 16 * 1024 * 1024;

/// gRPC tuning options, the same on both binaries (flags and config keys).
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GrpcOptions {
    /// HTTP/2 PING interval on gRPC connections; keep it below any NAT or load-balancer TCP
    /// idle timeout on the path. [default: 20s]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub grpc_keep_alive: Option<Duration>,
    /// A gRPC peer that does not answer a PING within this long is gone. [default: 20s]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub grpc_keep_alive_timeout: Option<Duration>,
}

impl GrpcOptions {
    /// The PING interval.
    pub fn keep_alive(&self) -> Duration {
        self.grpc_keep_alive
            .unwrap_or(DEFAULT_KEEP_ALIVE)
            .max(Duration::from_secs(1))
    }

    /// The PING answer deadline.
    pub fn keep_alive_timeout(&self) -> Duration {
        self.grpc_keep_alive_timeout
            .unwrap_or(DEFAULT_KEEP_ALIVE_TIMEOUT)
            .max(Duration::from_secs(1))
    }
}

/// An error and its sources on one line: tonic and hyper put the useful part (a TLS alert, a
/// refused connection) several sources deep.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = inner.source();
    }
    text
}

/// Accepts TCP connections on `listener` until `token` is cancelled, handing each to
/// `accepted` (which must not wait: spawn the handshake). An accept error (out of file
/// descriptors, usually) is logged, naming `port`, and retried after 100 ms rather than spun
/// on.
pub async fn accept_until(
    listener: &tokio::net::TcpListener,
    token: &tokio_util::sync::CancellationToken,
    port: &str,
    mut accepted: impl FnMut(tokio::net::TcpStream, std::net::SocketAddr),
) {
    loop {
        let result = tokio::select! {
            result = listener.accept() => result,
            () = token.cancelled() => return,
        };
        match result {
            Ok((tcp, remote)) => accepted(tcp, remote),
            Err(error) => {
                tracing::warn!(%error, port, "cannot accept a TCP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
