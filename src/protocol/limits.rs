//! Limits the brain imposes on what an agent sends it, defined once.
//!
//! Each is checked where the value enters the daemon (the local socket,
//! the configuration, the frame writer), so that nothing the brain would
//! refuse or truncate is accepted and stored first. Lengths are counted in
//! characters, as the brain (Python `len` on a `str`) counts them.

/// Longest engine name the brain accepts (`celery`, `rq`, ...).
pub const MAX_ENGINE_CHARS: usize = 40;
/// Longest task id the brain accepts.
pub const MAX_TASK_ID_CHARS: usize = 200;
/// Longest frame `id` the brain echoes intact in `acked_id`.
pub const MAX_FRAME_ID_CHARS: usize = 64;
/// Largest difference between a signed frame's `ts` and the receiver's
/// clock that the brain (and this daemon's verifier) accepts, in seconds.
/// Past it, the brain closes with 4403.
pub const MAX_CLOCK_SKEW_SECONDS: i64 = 60;
/// Clock skew worth a warning: half of [`MAX_CLOCK_SKEW_SECONDS`], so an
/// operator hears of a drifting clock before the brain refuses frames.
pub const WARN_CLOCK_SKEW_SECONDS: i64 = MAX_CLOCK_SKEW_SECONDS / 2;

/// Whether `name` is an engine name the brain accepts: 1 to
/// [`MAX_ENGINE_CHARS`] characters once trimmed.
pub fn engine_name_fits(name: &str) -> bool {
    let name = name.trim();
    !name.is_empty() && name.chars().count() <= MAX_ENGINE_CHARS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_names_are_counted_in_characters_not_bytes() {
        assert!(engine_name_fits("celery"));
        assert!(engine_name_fits(&"é".repeat(MAX_ENGINE_CHARS)));
        assert!(!engine_name_fits(&"e".repeat(MAX_ENGINE_CHARS + 1)));
        assert!(!engine_name_fits("   "));
        assert!(!engine_name_fits(""));
    }
}
