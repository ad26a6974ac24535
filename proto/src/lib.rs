//! The wire contract of sflow-relay, shared by `relay-agent` and `relay-sink`.
//!
//! This crate owns every byte that travels between the two: the protobuf messages and gRPC
//! service generated from `proto/sflow_relay/v1/relay.proto` ([`pb`]), the length-prefixed
//! framing used on QUIC streams ([`wire`]), and the line-delimited hex codec of the `--ssh-hex`
//! mode ([`wire::hex`]). It does no network I/O of its own beyond reading
//! frames from a caller's `AsyncRead`, and knows nothing of TLS or certificates (see `relay-certs`).
//!
//! # Wire format
//!
//! A QUIC connection between agent and sink negotiates ALPN [`ALPN`] and carries one
//! bidirectional stream, opened by the agent. Each direction is a sequence of frames:
//!
//! ```text
//!  0               4                                   4 + len
//!  +---------------+-----------------------------------+
//!  | len: u32 (BE) | protobuf message (len bytes)      |
//!  +---------------+-----------------------------------+
//! ```
//!
//! Agent → sink frames hold a [`pb::Batch`], sink → agent frames hold a [`pb::Ack`]. A reader
//! refuses a frame whose `len` exceeds its limit before allocating for it. Over gRPC the same
//! messages travel as the `sflow_relay.v1.Relay/Stream` call ([`GRPC_STREAM_PATH`]), with
//! gRPC's own framing, over HTTP/2 and TLS on TCP (ALPN [`GRPC_ALPN`]).
//!
//! # Layout
//!
//! - [`pb`] — generated protobuf types and the tonic client and server for the gRPC service.
//! - [`enroll_pb`] — the same for enrollment (`relay-sink --enroll-listen`, `relay-agent
//!   enroll`, renewal).
//! - [`wire`] — [`wire::Datagram`], frame encoding and decoding, [`wire::FrameReader`].
//! - [`wire::hex`] — one datagram per line of hex, the protocol of the older ssh pipe.
//! - [`compression`] — zstd over a batch's datagrams, negotiated per connection.
//! - [`sflow`] — the sFlow v5 header; per-stream sequence accounting (loss, reordering, restarts).
#![warn(missing_docs)]

pub mod compression;
pub mod sflow;
pub mod wire;

/// Types and gRPC service generated from `relay.proto` (package `sflow_relay.v1`).
#[allow(missing_docs, unreachable_pub, unused_qualifications, clippy::use_self)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/sflow_relay.v1.rs"));
}

/// Types and gRPC service of enrollment, generated from `enroll.proto` (package
/// `sflow_relay.enroll.v1`): a one-time token and a signing request in, a certificate chain
/// out, and renewal with the current certificate. Served by `relay-sink --enroll-listen` on a
/// port of its own, never on the relay port.
#[allow(missing_docs, unreachable_pub, unused_qualifications, clippy::use_self)]
pub mod enroll_pb {
    include!(concat!(env!("OUT_DIR"), "/sflow_relay.enroll.v1.rs"));
}

/// ALPN protocol name: the relay protocol and its major version. A peer that speaks another
/// version fails the TLS handshake instead of misreading frames.
pub const ALPN: &[u8] = b"sflow-relay/1";

/// ALPN protocol name of the same protocol with compressed batches accepted
/// ([`compression`]). An agent that compresses offers it first, then [`ALPN`]; a sink that
/// can decompress prefers it; an older sink picks [`ALPN`] and gets plain batches.
pub const ALPN_ZSTD: &[u8] = b"sflow-relay/1+zstd";

/// ALPN protocol name of the same protocol with compressed batches accepted, also those made
/// against the stream's history ([`compression::HISTORY_LEN`] bytes; `pb::Batch::zstd_prefix`).
/// A sink older than it picks [`ALPN_ZSTD`], and gets batches compressed each on its own.
pub const ALPN_ZSTD_HISTORY: &[u8] = b"sflow-relay/1+zstd-history";

/// The relay protocols a peer of this release speaks, in order of preference: QUIC's ALPN list
/// on both sides.
pub const RELAY_ALPNS: &[&[u8]] = &[ALPN_ZSTD_HISTORY, ALPN_ZSTD, ALPN];

/// gRPC response header by which a sink accepts compressed batches (value `zstd`): the gRPC
/// twin of [`ALPN_ZSTD`].
pub const GRPC_COMPRESSION_HEADER: &str = "sflow-relay-compression";

/// gRPC response header by which a sink accepts batches compressed against the call's history
/// (value: the bytes of history it keeps, [`compression::HISTORY_LEN`]): the gRPC twin of
/// [`ALPN_ZSTD_HISTORY`]. An older agent ignores it.
pub const GRPC_HISTORY_HEADER: &str = "sflow-relay-zstd-history";

/// ALPN protocol name on the gRPC (TCP) port: HTTP/2, as gRPC requires.
pub const GRPC_ALPN: &[u8] = b"h2";

/// HTTP/2 path of the `Relay.Stream` call. The agent sends batches it has already encoded
/// (once, for all its sinks) through a codec of its own, so it names the path itself rather
/// than through the generated client; a test checks this against the generated server.
pub const GRPC_STREAM_PATH: &str = "/sflow_relay.v1.Relay/Stream";

/// The largest UDP payload over IPv4 (65,535 − 8 − 20), and the largest datagram the relay
/// promises to carry. IPv6 allows 20 bytes more, which no sFlow agent sends; such a datagram is
/// relayed, but replaying it to an IPv4 destination fails and is counted as a replay error.
pub const MAX_DATAGRAM_LEN: usize = 65_507;

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_path_is_the_generated_services() {
        assert_eq!(
            super::GRPC_STREAM_PATH,
            format!("/{}/Stream", super::pb::relay_server::SERVICE_NAME)
        );
    }
}
