//! libFuzzer binary of the `token` target (see `relay_fuzz::target::token`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_fuzz::target::token(data));
