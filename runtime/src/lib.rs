//! Daemon plumbing shared by `relay-agent` and `relay-sink`, so that neither copies the other.
//!
//! # Layout
//!
//! - [`telemetry`] — tracing subscriber (`RUST_LOG`, `--log-format text|json`), logs on stderr.
//! - [`shutdown`] — waiting for SIGINT or SIGTERM.
//! - [`udp`] — binding UDP sockets with large kernel buffers, and saying when the kernel clamps them.
//! - [`cli`] — the start-up steps both binaries share (config file, logging, `--ssh-hex`,
//!   exit statuses).
//! - [`config`] — one set of option names for the command line and the TOML file, and the
//!   one way durations are written in both.
//! - [`daemon`] — the options both binaries share, declared once and flattened into each.
//! - [`grpc`] — gRPC (HTTP/2) keep-alive settings, and error chains made readable.
//! - [`quic`] — QUIC transport tuning (keep-alive, idle timeout, flow-control windows, congestion
//!   control, GSO) and the stateless-reset key.
//! - [`ssh_hex`] — the `--ssh-hex` mode, compatible with the `sflow_fwd.py | ssh` pipe.
//! - [`reload`] — when to re-read certificate files (SIGHUP, and a poll interval).
//! - [`threads`] — how many threads run the tasks (one by default, as measured).
//! - [`ratelimit`] — logging a recurring event at most once per interval.
//! - [`admission`] — which received datagrams the agent relays (`--accept`, `--allow-sources`).
//! - [`route`] — which datagrams a sink entry or a forward destination carries (`agents`,
//!   `sites`, `not-after`), matched on the sFlow agent address and the relay agent's name.
//! - [`accounting`] — sFlow sequence-gap accounting, per sFlow stream, as Prometheus series.
//! - [`observe`] — the `/metrics`, `/healthz`, `/readyz` endpoint, and metric registration.
//!
//! The wire format lives in `relay-proto` and the TLS policy in `relay-certs`, not here.

pub mod accounting;
pub mod admission;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod grpc;
pub mod observe;
pub mod quic;
pub mod ratelimit;
pub mod reload;
pub mod route;
pub mod shutdown;
pub mod ssh_hex;
pub mod telemetry;
pub mod threads;
pub mod udp;
