//! The stable-toolchain fuzzer: deterministic, seeded mutation of a corpus, bounded in time
//! and in count. It is not coverage-guided (libFuzzer is, for the long runs); it is what CI can
//! run inside `cargo test` on the stable toolchain, and it replays: the same seed and corpus
//! give the same inputs in the same order.
//!
//! Each round takes a corpus entry, or splices two, and applies one to eight mutations that
//! suit these decoders: bit flips, interesting bytes (`\n`, hex digits, protobuf tags),
//! big-endian `u32`s at any offset (lengths and sFlow fields: 0, 1, 5, limits ± 1, `u32::MAX`),
//! protobuf varints, and inserted, deleted or repeated runs.

use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crate::Target;

/// Largest input the driver makes.
pub const MAX_INPUT_LEN: usize = 16 * 1024;

/// How long to run, and from which seed.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Stop after this long…
    pub time: Duration,
    /// …or after this many inputs, whichever comes first.
    pub inputs: u64,
    /// Seed of the mutations.
    pub seed: u64,
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Inputs run, the corpus included.
    pub inputs: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// An input on which the target panicked.
#[derive(Debug)]
pub struct Finding {
    /// The input.
    pub input: Vec<u8>,
    /// Its number in the run (0 for the first corpus entry).
    pub index: u64,
    /// The panic message.
    pub message: String,
}

/// Runs `target` on every entry of `corpus` as it is, then on mutations of them until the
/// budget is spent. Stops at the first panic and returns its input.
///
/// # Errors
///
/// The [`Finding`] when the target panics.
pub fn run(target: Target, corpus: &[Vec<u8>], budget: Budget) -> Result<Report, Finding> {
    let start = Instant::now();
    let mut inputs = 0u64;
    for entry in corpus {
        call(target, entry, inputs)?;
        inputs += 1;
    }
    let mut rng = Rng::new(budget.seed);
    let empty = [Vec::new()];
    let corpus = if corpus.is_empty() {
        &empty[..]
    } else {
        corpus
    };
    let mut input = Vec::with_capacity(MAX_INPUT_LEN);
    while inputs < budget.inputs {
        // Checking the clock every input would cost more than the small inputs do.
        if inputs.is_multiple_of(64) && start.elapsed() >= budget.time {
            break;
        }
        input.clear();
        input.extend_from_slice(&rng.pick(corpus)[..]);
        for _ in 0..1 + rng.below(8) {
            mutate(&mut input, corpus, &mut rng);
        }
        input.truncate(MAX_INPUT_LEN);
        call(target, &input, inputs)?;
        inputs += 1;
    }
    Ok(Report {
        inputs,
        elapsed: start.elapsed(),
    })
}

fn call(target: Target, input: &[u8], index: u64) -> Result<(), Finding> {
    panic::catch_unwind(AssertUnwindSafe(|| target(input))).map_err(|payload| Finding {
        input: input.to_vec(),
        index,
        message: payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic without a message".to_owned()),
    })
}

/// Bytes that mean something to one of the decoders.
const BYTES: &[u8] = &[
    0x00, 0x01, 0x02, 0x05, 0x7f, 0x80, 0xff, b'\n', b'\r', b' ', b'\t', b'0', b'9', b'a', b'f',
    b'A', b'F', b'g', 0x09, 0x0a, 0x10, 0x12, 0x18, 0x1a, 0x21, 0x22, 0x28, 0xb5, 0x2f, 0xfd,
];

/// Big-endian `u32`s that mean something: small counts, sFlow's version and address types,
/// the frame and datagram limits and their neighbours, the sign bit, the maximum.
const WORDS: &[u32] = &[
    0,
    1,
    2,
    3,
    4,
    5,
    16,
    17,
    255,
    256,
    1_400,
    4_096,
    65_507,
    65_535,
    65_536,
    65_537,
    1 << 20,
    4 * 1024 * 1024,
    4 * 1024 * 1024 + 1,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
];

fn mutate(input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut Rng) {
    let len = input.len();
    match rng.below(11) {
        0 if len > 0 => {
            let at = rng.below(len);
            input[at] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let at = rng.below(len);
            input[at] = if rng.below(2) == 0 {
                *rng.pick(BYTES)
            } else {
                rng.next() as u8
            };
        }
        2 if len >= 4 => {
            let at = rng.below(len - 3);
            let word = rng
                .pick(WORDS)
                .wrapping_add(rng.below(3) as u32)
                .wrapping_sub(1);
            input[at..at + 4].copy_from_slice(&word.to_be_bytes());
        }
        3 => {
            // A protobuf varint: a length or a field value.
            let mut value = match rng.below(3) {
                0 => rng.below(300) as u64,
                1 => u64::from(*rng.pick(WORDS)),
                _ => rng.next(),
            };
            let at = rng.below(len + 1);
            let mut varint = Vec::with_capacity(10);
            loop {
                let byte = (value & 0x7f) as u8;
                value >>= 7;
                if value == 0 {
                    varint.push(byte);
                    break;
                }
                varint.push(byte | 0x80);
            }
            input.splice(at..at, varint);
        }
        4 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| *rng.pick(BYTES)).collect();
            input.splice(at..at, bytes);
        }
        5 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            input.drain(at..at + n);
        }
        6 if len > 0 => {
            // Repeat a run: long lines, many frames, repeated fields.
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(256));
            let run = input[at..at + n].to_vec();
            let times = 1 + rng.below(16);
            for _ in 0..times {
                input.splice(at..at, run.iter().copied());
            }
        }
        7 if len > 0 => input.truncate(rng.below(len)),
        8 => {
            // Splice: a piece of another entry, at any place.
            let other = rng.pick(corpus);
            if !other.is_empty() {
                let from = rng.below(other.len());
                let n = 1 + rng.below(other.len() - from);
                let at = rng.below(len + 1);
                input.splice(at..at, other[from..from + n].iter().copied());
            }
        }
        9 => {
            // Another entry after this one (skipping its selector byte): one more frame, line or
            // datagram on the stream.
            let other = rng.pick(corpus);
            input.extend_from_slice(other.get(1..).unwrap_or_default());
        }
        _ if len > 0 => input[0] = rng.next() as u8,
        _ => input.push(rng.next() as u8),
    }
}

/// xorshift64*: deterministic, no dependency.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n`; `n` must not be 0.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picky(input: &[u8]) {
        assert!(!input.windows(2).any(|w| w == b"\x05\n"), "found it");
    }

    #[test]
    fn replays_and_reports_the_input() {
        let corpus = vec![b"\x01abc".to_vec(), b"\x02\x05".to_vec()];
        let budget = Budget {
            time: Duration::from_secs(60),
            inputs: 2_000_000,
            seed: 1,
        };
        let a = run(picky, &corpus, budget).unwrap_err();
        let b = run(picky, &corpus, budget).unwrap_err();
        assert!(a.input.windows(2).any(|w| w == b"\x05\n"));
        assert_eq!(
            (a.index, a.input),
            (b.index, b.input),
            "the same seed replays the same run"
        );
        assert!(a.message.contains("found it"), "{}", a.message);
        let report = run(
            |_| {},
            &corpus,
            Budget {
                inputs: 100,
                ..budget
            },
        )
        .unwrap();
        assert_eq!(report.inputs, 100);
    }
}
