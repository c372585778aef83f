//! Producers that outrun the disk: the records waiting for a commit are
//! bounded over all connections, and the bound never deadlocks them.

use crate::support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::{event, options, TestDaemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_and_forget_producers_far_above_the_in_flight_budget_lose_nothing() {
    // Nothing listens on port 9: the spool only grows.
    let d = TestDaemon::start(options("http://127.0.0.1:9")).await;
    let clients = 4;
    let messages = 20;
    let per_message = 100;
    // About 4 KB per event: 4 x 20 x 100 x 4 KB = 32 MB written without
    // waiting for any ack, four times the 8 MiB in-flight budget.
    let blob = "x".repeat(4000);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = d.client().await;
        let blob = blob.clone();
        tasks.push(tokio::spawn(async move {
            for m in 0..messages {
                let events: Vec<_> = (0..per_message)
                    .map(|i| {
                        let mut e = event(&format!("c{c}-m{m}-{i}"), "task.received");
                        e.data["blob"] = blob.clone().into();
                        e
                    })
                    .collect();
                client.send(&events).await.unwrap();
            }
            // The pong comes after everything this connection sent was handled.
            client.ping().await.unwrap();
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("no producer is stuck")
            .unwrap();
    }
    // Every event is committed: none dropped, none refused.
    let total = (clients * messages * per_message) as u64;
    let mut c = d.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats = c.stats().await.unwrap();
        let depth = stats.get("spool_depth").and_then(|v| v.as_u64());
        if depth == Some(total) {
            assert_eq!(stats.get("refused").and_then(|v| v.as_u64()), Some(0));
            assert_eq!(stats.get("dropped").and_then(|v| v.as_u64()), Some(0));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every event was committed: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(d.stats.events_received.load(Ordering::Relaxed), total);
    d.stop().await.unwrap();
}
