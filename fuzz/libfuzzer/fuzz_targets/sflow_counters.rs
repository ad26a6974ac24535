//! libFuzzer binary of the `sflow_counters` target (see `relay_fuzz::target::sflow_counters`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_fuzz::target::sflow_counters(data));
