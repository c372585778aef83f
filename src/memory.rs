//! Giving memory back to the operating system once a burst is over.
//!
//! The allocator keeps the pages a large message used after it is freed,
//! for reuse, and returns them to the system only when later allocations
//! pass by; each thread's share is returned only by that thread. A daemon
//! that goes idle after a burst of large messages (a hostile client, say)
//! would keep them for good. The binary, which chooses the allocator,
//! installs a hook here that gives back what the calling thread holds free
//! now; the ingest side asks for a release once such a burst is over, and
//! each runtime thread runs the hook once, the next time it goes idle.
//!
//! Without a hook (the library's own tests), nothing happens.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static HOOK: OnceLock<fn()> = OnceLock::new();
/// Releases asked for so far.
static ASKED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The last release this thread ran.
    static DONE: Cell<u64> = const { Cell::new(0) };
}

/// Installs the function that returns the calling thread's free memory to
/// the system. Only the first call counts.
pub fn set_release_hook(hook: fn()) {
    let _ = HOOK.set(hook);
}

/// Asks every runtime thread to give its free memory back, and does so for
/// the calling thread at once. May take a few milliseconds: call it after
/// a burst, not per message.
pub fn release_free_memory() {
    let asked = ASKED.fetch_add(1, Ordering::AcqRel) + 1;
    if let Some(hook) = HOOK.get() {
        DONE.with(|d| d.set(asked));
        hook();
    }
}

/// For the runtime's `on_thread_park`: runs the hook on this thread if a
/// release was asked for since it last did. Costs one atomic load otherwise.
pub fn on_thread_idle() {
    let asked = ASKED.load(Ordering::Acquire);
    if DONE.with(|d| d.replace(asked)) != asked {
        if let Some(hook) = HOOK.get() {
            hook();
        }
    }
}
