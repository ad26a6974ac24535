//! libFuzzer binary of the `batch` target (see `relay_fuzz::target::batch`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_fuzz::target::batch(data));
