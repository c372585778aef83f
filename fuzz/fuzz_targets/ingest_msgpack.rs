//! `cargo fuzz run ingest_msgpack`; the body is `z4j_agentd::fuzzing::ingest_msgpack`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| z4j_agentd::fuzzing::ingest_msgpack(data));
