//! libFuzzer binary of the `sflow` target (see `relay_fuzz::target::sflow`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_fuzz::target::sflow(data));
