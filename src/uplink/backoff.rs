//! Reconnect backoff by failure class, with full jitter.
//!
//! Each class keeps its own streak; the delay before attempt `n` of a class
//! is uniform in `[0, min(max, base * 2^n)]` ("full jitter"), so a fleet of
//! daemons that lost the same brain does not reconnect in lockstep. A
//! successful handshake resets every streak. Ranges follow the reference
//! agent. Which close code falls in which class is in [`super::close`].

use std::time::Duration;

use rand::Rng;

/// Why a connection attempt or session ended; decides the backoff range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Network, TLS, WebSocket errors, and close codes not listed below. 1 s -> 30 s.
    Connection,
    /// A frame from the brain we could not accept, a bad `hello_ack`. 1 s -> 60 s.
    Protocol,
    /// Token refused (4401), signature refused (4403), revoked (4003). 10 s -> 600 s.
    Auth,
    /// Protocol version refused (4426/4427) or a fatal incompatibility error. 120 s -> 3600 s.
    Incompatible,
}

impl FailureClass {
    /// `(base, max)` of this class.
    pub fn range(self) -> (Duration, Duration) {
        match self {
            FailureClass::Connection => (Duration::from_secs(1), Duration::from_secs(30)),
            FailureClass::Protocol => (Duration::from_secs(1), Duration::from_secs(60)),
            FailureClass::Auth => (Duration::from_secs(10), Duration::from_secs(600)),
            FailureClass::Incompatible => (Duration::from_secs(120), Duration::from_secs(3600)),
        }
    }

    /// Every class, in the order the metrics list them.
    pub const ALL: [FailureClass; 4] = [
        FailureClass::Connection,
        FailureClass::Protocol,
        FailureClass::Auth,
        FailureClass::Incompatible,
    ];

    /// Lowercase label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Connection => "connection",
            FailureClass::Protocol => "protocol",
            FailureClass::Auth => "auth",
            FailureClass::Incompatible => "incompatible",
        }
    }

    fn index(self) -> usize {
        match self {
            FailureClass::Connection => 0,
            FailureClass::Protocol => 1,
            FailureClass::Auth => 2,
            FailureClass::Incompatible => 3,
        }
    }
}

/// Per-class failure streaks.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    streaks: [u32; 4],
}

impl Backoff {
    /// No failures yet.
    pub fn new() -> Self {
        Backoff::default()
    }

    /// Records a failure of `class` and returns how long to wait.
    pub fn next_delay(&mut self, class: FailureClass, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(class);
        let i = class.index();
        self.streaks[i] = self.streaks[i].saturating_add(1);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(rng.random_range(0..=ms))
    }

    /// The upper bound of the next delay for `class` (before jitter).
    pub fn ceiling(&self, class: FailureClass) -> Duration {
        let (base, max) = class.range();
        let n = self.streaks[class.index()].min(20);
        base.saturating_mul(1u32 << n).min(max)
    }

    /// Failures in a row of `class`.
    pub fn streak(&self, class: FailureClass) -> u32 {
        self.streaks[class.index()]
    }

    /// After a successful handshake.
    pub fn reset(&mut self) {
        self.streaks = [0; 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ceilings_double_per_class_and_cap() {
        let mut b = Backoff::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..7 {
            ceilings.push(b.ceiling(FailureClass::Connection).as_secs());
            let d = b.next_delay(FailureClass::Connection, &mut rng);
            assert!(d <= Duration::from_secs(30));
        }
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 30, 30]);
        // Other classes keep their own streaks.
        assert_eq!(b.ceiling(FailureClass::Auth), Duration::from_secs(10));
        assert_eq!(
            b.ceiling(FailureClass::Incompatible),
            Duration::from_secs(120)
        );
        for _ in 0..10 {
            b.next_delay(FailureClass::Auth, &mut rng);
        }
        assert_eq!(b.ceiling(FailureClass::Auth), Duration::from_secs(600));
        b.reset();
        assert_eq!(b.ceiling(FailureClass::Connection), Duration::from_secs(1));
        assert_eq!(b.ceiling(FailureClass::Auth), Duration::from_secs(10));
    }

    #[test]
    fn jitter_spreads_over_the_whole_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let delays: Vec<Duration> = (0..200)
            .map(|_| {
                let mut b = Backoff::new();
                for _ in 0..5 {
                    b.next_delay(FailureClass::Connection, &mut rng);
                }
                b.next_delay(FailureClass::Connection, &mut rng)
            })
            .collect();
        let min = delays.iter().min().unwrap();
        let max = delays.iter().max().unwrap();
        assert!(*min < Duration::from_secs(5), "{min:?}");
        assert!(*max > Duration::from_secs(25), "{max:?}");
    }
}
