//! `cargo fuzz run ingest_json_lines`; the body is `z4j_agentd::fuzzing::ingest_json_lines`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| z4j_agentd::fuzzing::ingest_json_lines(data));
