//! A stand-in brain that verifies every frame and acknowledges it at once,
//! for measuring the daemon's own cost from socket to brain frame
//! (`benches/forward.sh`). It is the fake brain of the integration tests
//! (`tests/it/support/fake_brain.rs`), on a free loopback port.
//!
//! ```text
//! cargo run --release --example ack_brain
//! ```
//! prints `url=... token=... secret=...` on its first line, then one line
//! per second with the frames and events it acknowledged. Its credentials
//! are fixed test values; never point a real daemon at it.

#[path = "../tests/it/support/fake_brain.rs"]
mod fake_brain;

use std::sync::atomic::Ordering;
use std::time::Duration;

use fake_brain::{Behavior, FakeBrain, SECRET, TOKEN};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let brain = FakeBrain::start(Behavior::default()).await;
    println!("url={} token={TOKEN} secret={SECRET}", brain.url);
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let acks = brain.seen.acks_sent.load(Ordering::Relaxed);
        if acks != last {
            let events = brain.seen.event_ids.lock().unwrap().len();
            let failures = brain.seen.verify_failures.lock().unwrap().len();
            eprintln!("acks={acks} events={events} verify_failures={failures}");
            last = acks;
        }
    }
}
