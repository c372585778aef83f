//! The `z4j-agentd` binary: everything lives in the library.
#![forbid(unsafe_code)]

/// The ingest path allocates a small tree per decoded event; mimalloc's
/// thread-local free lists cut that cost by a third compared with glibc
/// malloc (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    z4j_agentd::cli::main()
}
