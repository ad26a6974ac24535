//! The bounded fuzz run of CI: each target on its checked-in corpus, then on seeded mutations
//! of it, for a few seconds (stable toolchain, inside `cargo test --workspace`).
//!
//! Environment: `RELAY_FUZZ_SECONDS` (default 3) and `RELAY_FUZZ_INPUTS` (default 1,000,000)
//! bound each target's run, whichever ends first; `RELAY_FUZZ_SEED` changes the mutations
//! (default: fixed per target, so CI replays). A longer local run on stable:
//! `RELAY_FUZZ_SECONDS=60 cargo test --release -p relay-fuzz --test ci -- --nocapture`.
//! A finding is written to `target/tmp/relay-fuzz/<target>-<index>`; copied into
//! `fuzz/corpus/<target>/`, it runs first from then on.

use std::time::Duration;

use relay_fuzz::driver::{self, Budget};
use relay_fuzz::{TARGETS, corpus_dir};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

fn fuzz(name: &str) {
    let target = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("a target of that name")
        .1;
    let dir = corpus_dir(name);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    paths.sort();
    let corpus: Vec<Vec<u8>> = paths
        .iter()
        .map(|p| std::fs::read(p).expect("a readable corpus file"))
        .collect();
    assert!(!corpus.is_empty(), "{} is empty", dir.display());
    // A different but fixed sequence of mutations per target.
    let per_target = name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31) ^ u64::from(b));
    let budget = Budget {
        time: Duration::from_secs_f64(env("RELAY_FUZZ_SECONDS", 3.0)),
        inputs: env("RELAY_FUZZ_INPUTS", 1_000_000),
        seed: env("RELAY_FUZZ_SEED", 0x5f1a_u64) ^ per_target,
    };
    match driver::run(target, &corpus, budget) {
        Ok(report) => println!(
            "fuzz {name}: {} inputs ({} from the corpus) in {:.1?}, seed {:#x}, no finding",
            report.inputs,
            corpus.len(),
            report.elapsed,
            budget.seed
        ),
        Err(finding) => {
            let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("relay-fuzz");
            std::fs::create_dir_all(&dir).expect("a findings folder");
            let path = dir.join(format!("{name}-{}", finding.index));
            std::fs::write(&path, &finding.input).expect("the finding written");
            panic!(
                "fuzz {name}: finding at input {} (seed {:#x}), saved to {}: {}\ninput: {:02x?}",
                finding.index,
                budget.seed,
                path.display(),
                finding.message,
                &finding.input[..finding.input.len().min(256)]
            );
        }
    }
}

#[test]
fn frame() {
    fuzz("frame");
}

#[test]
fn batch() {
    fuzz("batch");
}

#[test]
fn hex_lines() {
    fuzz("hex_lines");
}

#[test]
fn sflow() {
    fuzz("sflow");
}

#[test]
fn sflow_counters() {
    fuzz("sflow_counters");
}

#[test]
fn expand() {
    fuzz("expand");
}

#[test]
fn token() {
    fuzz("token");
}

#[test]
fn every_target_has_a_test_and_a_corpus() {
    for (name, _) in TARGETS {
        assert!(
            [
                "frame",
                "batch",
                "hex_lines",
                "sflow",
                "sflow_counters",
                "expand",
                "token"
            ]
            .contains(name),
            "{name} has no test here"
        );
        assert!(corpus_dir(name).is_dir(), "no corpus for {name}");
    }
}
