//! A small async client for the local socket (native MessagePack framing).
//!
//! For Rust producers, the load generator and the tests. Python and shell
//! producers use the same contract (`docs/local-protocol.md`).

use std::io;
use std::path::Path;

use serde::Serialize;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::protocol::Value;

/// One task event as a producer sends it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Task engine, e.g. `celery`.
    pub engine: String,
    /// Event kind, e.g. `task.received`.
    pub kind: String,
    /// Task id (`""` for worker events).
    pub task_id: String,
    /// ISO-8601 time; the daemon stamps the receive time when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
    /// Kind-specific data (`task_name`, `queue`, `args`, `result`...).
    pub data: serde_json::Value,
}

/// Client failures.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Socket I/O.
    #[error("local socket: {0}")]
    Io(#[from] io::Error),
    /// The daemon refused something.
    #[error("the daemon refused it: {code}: {message}")]
    Refused {
        /// Error code.
        code: String,
        /// Error message.
        message: String,
    },
    /// An unexpected reply.
    #[error("unexpected reply from the daemon: {0}")]
    Protocol(String),
}

/// A connection to the daemon.
pub struct Client {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    next_ack: u64,
    buf: Vec<u8>,
    /// Commands that arrived while waiting for another reply.
    commands: std::collections::VecDeque<Value>,
}

#[derive(Serialize)]
struct EventsMsg<'a> {
    r#type: &'static str,
    events: &'a [Event],
    #[serde(skip_serializing_if = "Option::is_none")]
    ack_id: Option<u64>,
}

impl Client {
    /// Connects to the daemon's socket.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).await?;
        let (rd, wr) = stream.into_split();
        Ok(Client {
            rd: BufReader::new(rd),
            wr,
            next_ack: 1,
            buf: Vec::new(),
            commands: std::collections::VecDeque::new(),
        })
    }

    async fn write_msg<T: Serialize>(&mut self, msg: &T) -> Result<(), ClientError> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0, 0, 0, 0]);
        rmp_serde::encode::write_named(&mut self.buf, msg)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let len = (self.buf.len() - 4) as u32;
        self.buf[..4].copy_from_slice(&len.to_be_bytes());
        self.wr.write_all(&self.buf).await?;
        Ok(())
    }

    /// Reads one reply; a `command` from the daemon is kept for
    /// [`Client::next_command`] and the next message is read instead.
    pub async fn read_reply(&mut self) -> Result<Value, ClientError> {
        loop {
            let v = self.read_message().await?;
            if v.get("type").and_then(Value::as_str) == Some("command") {
                self.commands.push_back(v);
                continue;
            }
            return Ok(v);
        }
    }

    async fn read_message(&mut self) -> Result<Value, ClientError> {
        let mut len = [0u8; 4];
        self.rd.read_exact(&mut len).await?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.rd.read_exact(&mut body).await?;
        rmp_serde::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Registers this process (`hello`).
    pub async fn hello(&mut self, process: &str, engines: &[&str]) -> Result<(), ClientError> {
        let mut m = Value::empty_map();
        m.insert("type", "hello");
        m.insert("process", process);
        m.insert("pid", std::process::id() as u64);
        m.insert(
            "engines",
            Value::Array(engines.iter().map(|e| Value::from(*e)).collect()),
        );
        self.write_msg(&m).await
    }

    /// Sends any message as it is (for messages this client has no method for).
    pub async fn write_raw(&mut self, msg: &Value) -> Result<(), ClientError> {
        self.write_msg(msg).await
    }

    /// Registers this process with the actions it runs per engine
    /// (`capabilities`), so the daemon routes the brain's commands to it;
    /// waits for `hello_ack`.
    pub async fn hello_with_capabilities(
        &mut self,
        process: &str,
        capabilities: &[(&str, &[&str])],
    ) -> Result<(), ClientError> {
        let ack_id = self.next_ack;
        self.next_ack += 1;
        let mut caps = Value::empty_map();
        for (engine, actions) in capabilities {
            caps.insert(
                *engine,
                Value::Array(actions.iter().map(|a| Value::from(*a)).collect()),
            );
        }
        let mut m = Value::empty_map();
        m.insert("type", "hello");
        m.insert("process", process);
        m.insert(
            "engines",
            Value::Array(capabilities.iter().map(|(e, _)| Value::from(*e)).collect()),
        );
        m.insert("capabilities", caps);
        m.insert("ack_id", ack_id);
        self.write_msg(&m).await?;
        loop {
            let reply = self.read_reply().await?;
            match reply.get("type").and_then(Value::as_str) {
                Some("hello_ack")
                    if reply.get("ack_id").and_then(Value::as_u64) == Some(ack_id) =>
                {
                    return Ok(())
                }
                Some("error") => return Err(refusal(&reply)),
                _ => continue,
            }
        }
    }

    /// Waits for the next `command` the daemon routes to this connection.
    pub async fn next_command(&mut self) -> Result<Value, ClientError> {
        loop {
            if let Some(c) = self.commands.pop_front() {
                return Ok(c);
            }
            let v = self.read_message().await?;
            if v.get("type").and_then(Value::as_str) == Some("command") {
                return Ok(v);
            }
        }
    }

    /// Answers a command (`command_result`) and waits for the daemon's ack.
    /// `result` must be a map (or `None`).
    pub async fn command_result(
        &mut self,
        id: &str,
        success: bool,
        result: Option<Value>,
        error: Option<&str>,
    ) -> Result<(), ClientError> {
        let ack_id = self.next_ack;
        self.next_ack += 1;
        let mut m = Value::empty_map();
        m.insert("type", "command_result");
        m.insert("id", id);
        m.insert("status", if success { "success" } else { "failed" });
        m.insert("result", result.unwrap_or(Value::Null));
        m.insert("error", error.map(Value::from).unwrap_or(Value::Null));
        m.insert("ack_id", ack_id);
        self.write_msg(&m).await?;
        loop {
            let reply = self.read_reply().await?;
            match reply.get("type").and_then(Value::as_str) {
                Some("ack") if reply.get("ack_id").and_then(Value::as_u64) == Some(ack_id) => {
                    return Ok(())
                }
                Some("error") if reply.get("ack_id").and_then(Value::as_u64) == Some(ack_id) => {
                    return Err(refusal(&reply))
                }
                _ => continue,
            }
        }
    }

    /// Sends events without waiting (fire-and-forget).
    pub async fn send(&mut self, events: &[Event]) -> Result<(), ClientError> {
        self.write_msg(&EventsMsg {
            r#type: "events",
            events,
            ack_id: None,
        })
        .await
    }

    /// Sends events and waits until the daemon committed them to its spool;
    /// returns how many were stored. A refused event is an error.
    pub async fn send_durable(&mut self, events: &[Event]) -> Result<u64, ClientError> {
        let ack_id = self.send_with_ack(events).await?;
        self.wait_ack(ack_id).await
    }

    /// Sends events asking for a durable ack; returns the `ack_id` to wait for
    /// with [`Client::wait_ack`] (so several batches can be in flight).
    pub async fn send_with_ack(&mut self, events: &[Event]) -> Result<u64, ClientError> {
        let ack_id = self.next_ack;
        self.next_ack += 1;
        self.write_msg(&EventsMsg {
            r#type: "events",
            events,
            ack_id: Some(ack_id),
        })
        .await?;
        Ok(ack_id)
    }

    /// Waits for the ack of `ack_id`; returns the stored count.
    pub async fn wait_ack(&mut self, ack_id: u64) -> Result<u64, ClientError> {
        loop {
            let reply = self.read_reply().await?;
            match reply.get("type").and_then(Value::as_str) {
                Some("ack") if reply.get("ack_id").and_then(Value::as_u64) == Some(ack_id) => {
                    return Ok(reply.get("stored").and_then(Value::as_u64).unwrap_or(0));
                }
                Some("ack") => continue,
                Some("error") => return Err(refusal(&reply)),
                other => return Err(ClientError::Protocol(format!("{other:?}"))),
            }
        }
    }

    /// Asks for the daemon's counters (`stats`).
    pub async fn stats(&mut self) -> Result<Value, ClientError> {
        let mut m = Value::empty_map();
        m.insert("type", "stats");
        self.write_msg(&m).await?;
        self.read_until("stats").await
    }

    /// Round trip (`ping` -> `pong`).
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        let mut m = Value::empty_map();
        m.insert("type", "ping");
        self.write_msg(&m).await?;
        self.read_until("pong").await.map(|_| ())
    }

    /// Reads replies until one of type `want`. Replies to earlier messages
    /// are skipped; but when the daemon closes the connection first, the
    /// error it closed it for (`not_allowed`, `too_many_clients`,
    /// `message_too_large`, `incomplete_message`) is the answer, not the
    /// bare end of the stream.
    async fn read_until(&mut self, want: &str) -> Result<Value, ClientError> {
        let mut last_error = None;
        loop {
            match self.read_reply().await {
                Ok(reply) => match reply.get("type").and_then(Value::as_str) {
                    Some(t) if t == want => return Ok(reply),
                    // Only the errors after which the daemon closes the
                    // connection; others answer earlier messages.
                    Some("error")
                        if matches!(
                            reply.get("code").and_then(Value::as_str),
                            Some(
                                "not_allowed"
                                    | "too_many_clients"
                                    | "message_too_large"
                                    | "incomplete_message"
                            )
                        ) =>
                    {
                        last_error = Some(reply)
                    }
                    _ => {}
                },
                Err(e) => return Err(last_error.as_ref().map(refusal).unwrap_or(e)),
            }
        }
    }
}

fn refusal(reply: &Value) -> ClientError {
    let text = |k: &str| {
        reply
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    ClientError::Refused {
        code: text("code"),
        message: text("message"),
    }
}
