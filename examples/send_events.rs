//! Sends one task's lifecycle to a running z4j-agentd with the library's
//! client and waits until the daemon has committed it to its spool.
//!
//! ```text
//! Z4J_SOCKET_PATH=/run/z4j-agentd/agent.sock cargo run --example send_events -- my-task-1
//! ```

use z4j_agentd::client::{Client, Event};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let socket = std::env::var("Z4J_SOCKET_PATH")
        .map_err(|_| "set Z4J_SOCKET_PATH to the daemon's socket")?;
    let task_id = std::env::args()
        .nth(1)
        .unwrap_or_else(|| format!("rust-example-{}", std::process::id()));
    let mut client = Client::connect(&socket).await?;
    client.hello("send_events example", &["celery"]).await?;
    let data = serde_json::json!({"task_name": "app.tasks.add", "queue": "default", "args": [2, 3], "kwargs": {}});
    let lifecycle = [
        ("task.received", data.clone()),
        (
            "task.started",
            serde_json::json!({"task_name": "app.tasks.add", "queue": "default", "worker": "rust-example"}),
        ),
        (
            "task.succeeded",
            serde_json::json!({"task_name": "app.tasks.add", "queue": "default", "result": 5, "runtime_ms": 3}),
        ),
    ];
    let events: Vec<Event> = lifecycle
        .into_iter()
        .map(|(kind, data)| Event {
            engine: "celery".into(),
            kind: kind.into(),
            task_id: task_id.clone(),
            occurred_at: None,
            data,
        })
        .collect();
    let stored = client.send_durable(&events).await?;
    println!("stored {stored} events for task {task_id}");
    Ok(())
}
