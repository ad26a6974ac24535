//! QUIC transport settings shared by agent and sink, and endpoint construction.
//!
//! quinn's defaults suit a 100 Mbit/s × 100 ms path and send no keep-alives. A relay link is
//! long-lived and often idle between bursts, and crosses NATs and load balancers whose UDP idle
//! timers are as short as 30 s, so keep-alives are on by default here. The windows are settable
//! for long fat links (bandwidth × RTT).

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::{EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use quinn_proto::HashedConnectionIdGenerator;
use serde::{Deserialize, Serialize};

use crate::config::duration;

/// Default keep-alive interval: well below common NAT/load-balancer UDP timeouts (30 s+).
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Default idle timeout: a peer silent this long (no keep-alive answered) is gone.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default per-stream receive window: 8 MiB, about 1 Gbit/s at 64 ms RTT.
pub const DEFAULT_STREAM_WINDOW: u64 = 8 * 1024 * 1024;
/// Default per-connection receive window.
pub const DEFAULT_CONN_WINDOW: u64 = 16 * 1024 * 1024;
/// Default send window.
pub const DEFAULT_SEND_WINDOW: u64 = 16 * 1024 * 1024;

/// Congestion controller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC (quinn's default): the well-understood choice.
    #[default]
    Cubic,
    /// NewReno: gentler, for shared links where the relay must yield.
    Newreno,
    /// BBR (experimental in quinn): for lossy long-distance paths.
    Bbr,
}

/// QUIC tuning options, the same on both binaries (flags and config keys).
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct QuicOptions {
    /// QUIC keep-alive interval (e.g. 5s); 0s turns keep-alives off. Keep it below the idle
    /// timeout and below any NAT or load-balancer UDP timeout on the path. [default: 5s]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<Duration>,
    /// Close the connection after this long without hearing from the peer. [default: 30s]
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    #[serde(default, with = "duration", skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// Per-stream receive window, bytes; raise to bandwidth × RTT on long fat links. [default: 8 MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_window: Option<u64>,
    /// Per-connection receive window, bytes. [default: 16 MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn_window: Option<u64>,
    /// Send window, bytes. [default: 16 MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_window: Option<u64>,
    /// Congestion controller. [default: cubic]
    #[arg(long, value_enum, value_name = "ALGORITHM")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub congestion: Option<Congestion>,
    /// UDP segmentation offload (GSO); turn off on kernels or NICs where it misbehaves. [default: true]
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gso: Option<bool>,
}

impl QuicOptions {
    /// The quinn transport configuration. One bidirectional stream per connection is all the
    /// protocol uses; a few more are allowed so a reconnecting agent's new stream is never
    /// refused while an old one drains.
    pub fn transport_config(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        let keep_alive = self.keep_alive.unwrap_or(DEFAULT_KEEP_ALIVE);
        t.keep_alive_interval((!keep_alive.is_zero()).then_some(keep_alive));
        let idle = self.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        t.max_idle_timeout(IdleTimeout::try_from(idle).ok());
        t.stream_receive_window(varint(self.stream_window.unwrap_or(DEFAULT_STREAM_WINDOW)));
        t.receive_window(varint(self.conn_window.unwrap_or(DEFAULT_CONN_WINDOW)));
        t.send_window(self.send_window.unwrap_or(DEFAULT_SEND_WINDOW));
        t.max_concurrent_bidi_streams(VarInt::from_u32(4));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        t.datagram_receive_buffer_size(None);
        t.enable_segmentation_offload(self.gso.unwrap_or(true));
        match self.congestion.unwrap_or_default() {
            Congestion::Cubic => t.congestion_controller_factory(Arc::new(CubicConfig::default())),
            Congestion::Newreno => {
                t.congestion_controller_factory(Arc::new(NewRenoConfig::default()))
            }
            Congestion::Bbr => t.congestion_controller_factory(Arc::new(BbrConfig::default())),
        };
        t
    }
}

fn varint(v: u64) -> VarInt {
    VarInt::from_u64(v).unwrap_or(VarInt::MAX)
}

/// A quinn endpoint on an already-bound socket.
///
/// `reset_secret` keys QUIC stateless resets. Derive it from something stable across restarts
/// (the sink uses its private key): a restarted sink then resets the connections of its
/// previous run at once, and agents reconnect without waiting out the idle timeout.
///
/// # Errors
///
/// When the socket cannot be registered with the runtime.
pub fn endpoint(
    socket: UdpSocket,
    server: Option<quinn::ServerConfig>,
    reset_secret: Option<&[u8]>,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = EndpointConfig::default();
    if let Some(secret) = reset_secret {
        let derive = |label: &[u8]| {
            ring::digest::digest(&ring::digest::SHA256, &[label, b"\0", secret].concat())
        };
        let reset_key = derive(b"sflow-relay stateless reset v1");
        config.reset_key(Arc::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            reset_key.as_ref(),
        )));
        // The restarted endpoint must also recognise its predecessor's connection IDs as its
        // own, or it drops their packets instead of answering with a reset.
        let cid_key = derive(b"sflow-relay connection id v1");
        let cid_key = u64::from_le_bytes(cid_key.as_ref()[..8].try_into().expect("8 bytes"));
        config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
    }
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
}
