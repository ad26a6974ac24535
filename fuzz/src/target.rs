//! The fuzz targets, one module each, and what they share.
//!
//! Inputs are raw bytes. Where a decoder takes a parameter (a frame or expansion limit, a
//! largest datagram, how a stream is cut into reads), the first byte of the input chooses it,
//! so the fuzzer explores the parameters as it explores the bytes (`token` has none: its input
//! is the text).

mod batch;
mod expand;
mod frame;
mod hex_lines;
mod sflow;
mod sflow_counters;
mod token;

pub use batch::batch;
pub use expand::expand;
pub use frame::frame;
pub use hex_lines::hex_lines;
pub use sflow::sflow;
pub use sflow_counters::sflow_counters;
pub use token::token;

use crate::alloc::Usage;

/// Limits the frame and batch targets pick from: the default, the sizes a configuration
/// would set, and the edge cases.
const LIMITS: [usize; 8] = [
    proto::wire::DEFAULT_MAX_FRAME_LEN,
    1 << 20,
    65_536,
    4_096,
    256,
    16,
    1,
    0,
];

/// The limit chosen by `selector`.
fn limit(selector: u8) -> usize {
    LIMITS[usize::from(selector) % LIMITS.len()]
}

/// Panics when `usage` exceeds `largest` for one allocation or `peak` live at once.
#[track_caller]
fn assert_within(usage: Usage, largest: usize, peak: usize, what: &str) {
    assert!(
        usage.largest <= largest,
        "{what}: an allocation of {} bytes, over the bound of {largest}",
        usage.largest
    );
    assert!(
        usage.peak <= peak,
        "{what}: {} bytes live at once, over the bound of {peak}",
        usage.peak
    );
}
