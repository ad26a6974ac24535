//! libFuzzer binary of the `hex_lines` target (see `relay_fuzz::target::hex_lines`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_fuzz::target::hex_lines(data));
