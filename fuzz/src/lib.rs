//! Fuzz targets for the decoders of `relay-proto` and the token reader of `relay-certs`:
//! everything that reads bytes a peer, a pipe, an sFlow agent or an enrolling client controls.
//!
//! Each target is a plain `fn(&[u8])` that panics on a finding and returns otherwise. Two
//! engines run them:
//!
//! - **libFuzzer**, coverage-guided, through cargo-fuzz on the nightly toolchain, for the long
//!   local runs: `fuzz/libfuzzer/` is a cargo-fuzz project (outside the workspace, with its own
//!   lockfile) whose binaries each call one target here.
//! - **[`driver`]**, deterministic seeded mutation of the checked-in corpus on the stable
//!   toolchain, bounded in time and count: what `cargo test --workspace` runs in CI
//!   (`tests/ci.rs`).
//!
//! The targets check more than "no panic": errors come back as errors, what decodes
//! re-encodes and decodes to the same thing, feeding a stream in pieces gives what feeding it
//! whole does, and (through the counting allocator in [`alloc`]) no allocation follows a
//! length field past the limit the decoder was given.
//!
//! # Layout
//!
//! - [`target`] — the seven targets: [`target::frame`], [`target::batch`],
//!   [`target::hex_lines`], [`target::sflow`], [`target::sflow_counters`], [`target::expand`],
//!   [`target::token`], and [`TARGETS`] by name.
//! - [`driver`] — the stable-toolchain mutator.
//! - [`alloc`] — the counting global allocator.
//! - `corpus/<target>/` — the checked-in seeds, written by `tests/corpus.rs`.

pub mod alloc;
pub mod driver;
pub mod target;

/// A fuzz target: panics on a finding.
pub type Target = fn(&[u8]);

/// Every target by name, as the corpus folders and the libFuzzer binaries are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame", target::frame),
    ("batch", target::batch),
    ("hex_lines", target::hex_lines),
    ("sflow", target::sflow),
    ("sflow_counters", target::sflow_counters),
    ("expand", target::expand),
    ("token", target::token),
];

/// The checked-in corpus folder of `target` (`fuzz/corpus/<target>`).
pub fn corpus_dir(target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}
