//! `cargo fuzz run canonical_json`; the body is `z4j_agentd::fuzzing::canonical_json`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| z4j_agentd::fuzzing::canonical_json(data));
