//! libFuzzer binary of the `expand` target (see `relay_fuzz::target::expand`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_fuzz::target::expand(data));
