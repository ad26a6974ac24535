//! End-to-end: enrollment without moving private keys (issue 19), through the real binaries.
//!
//! - [`online`]: a token from `relay-certs token`, `relay-agent enroll` against `relay-sink
//!   --enroll-listen`, and a relay with what it wrote; every refusal with its own reason and
//!   security event; enrolling again after a kill between request and answer.
//! - [`renewal`]: certificates issued for 60 s, renewed by the agent on its own while it
//!   streams; a revoked agent's renewal refused.
//! - [`hostile`]: garbage, plaintext HTTP and 1,000 bad tokens at the enrollment port.

mod hostile;
mod online;
mod renewal;
