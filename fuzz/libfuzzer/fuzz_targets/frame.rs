//! libFuzzer binary of the `frame` target (see `relay_fuzz::target::frame`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_fuzz::target::frame(data));
