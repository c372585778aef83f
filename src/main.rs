//! The `z4j-agentd` binary: everything lives in the library.
// Denied, not forbidden: `give_back_memory` below is the one exception.
#![deny(unsafe_code)]

/// The ingest path allocates a small tree per decoded event; mimalloc's
/// thread-local free lists cut that cost by a third compared with glibc
/// malloc (see BENCHMARKS.md). Built with `no_thp`: mimalloc does not ask
/// for transparent huge pages, which backed its first arena with 2 MiB
/// pages and more than doubled the idle RSS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Makes mimalloc return the memory that is free now to the system. It
/// does so by itself only when later allocations pass by, so a daemon that
/// goes idle after a burst of large messages kept hundreds of megabytes.
/// The ingest side calls this once such a burst is over
/// (`z4j_agentd::memory`).
// Allowed here only: a foreign function has no safe binding. mimalloc
// documents `mi_collect` as callable from any thread at any time; it takes
// a plain bool and touches no memory of ours.
#[allow(unsafe_code)]
fn give_back_memory() {
    // SAFETY: see above; no pointer crosses the boundary.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

fn main() -> std::process::ExitCode {
    z4j_agentd::memory::set_release_hook(give_back_memory);
    // Where THP is "always" rather than "madvise", the kernel would still
    // back aligned regions with huge pages; a small daemon wants the 4 KiB
    // granularity (about 10 MB idle instead of 21 MB). Best effort.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    z4j_agentd::cli::main()
}
