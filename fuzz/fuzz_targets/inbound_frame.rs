//! `cargo fuzz run inbound_frame`; the body is `z4j_agentd::fuzzing::inbound_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| z4j_agentd::fuzzing::inbound_frame(data));
