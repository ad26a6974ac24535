//! End-to-end tests of `relay-sink --sflow-metrics`, sFlow interface counters served at
//! `/metrics/sflow`, through the real agent and sink:
//!
//! - [`rate`]: a real Prometheus scrapes them, and `rate()` matches the counter samples sent
//!   across a 32-bit wrap and an agent restart; `promtool check metrics` accepts them.
//! - [`truth`]: every exported series equals what tshark decodes from the datagrams replayed,
//!   for the project's generator and for pmacctd's sfprobe.

mod rate;
mod truth;
