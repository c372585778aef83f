//! The `z4j-agentd` binary: everything lives in the library.
#![forbid(unsafe_code)]

/// The ingest path allocates a small tree per decoded event; mimalloc's
/// thread-local free lists cut that cost by a third compared with glibc
/// malloc (see BENCHMARKS.md). Built with `no_thp`: mimalloc does not ask
/// for transparent huge pages, which backed its first arena with 2 MiB
/// pages and more than doubled the idle RSS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Where THP is "always" rather than "madvise", the kernel would still
    // back aligned regions with huge pages; a small daemon wants the 4 KiB
    // granularity (about 10 MB idle instead of 21 MB). Best effort.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    z4j_agentd::cli::main()
}
