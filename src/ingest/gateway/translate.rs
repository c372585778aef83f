//! Protocol v2 frames of a local z4j agent <-> the daemon's local messages,
//! with no I/O: the gateway's whole vocabulary, testable on its own.
//!
//! Inbound, a verified frame becomes what a socket client would have sent
//! (`events`, `health`, `command_result`), so the same handler validates,
//! counts and stores it; outbound, the replies the handler and the router
//! produce for that connection (`ack`, `command`) become the frames the
//! brain would have sent (`event_batch_ack`, `command`).
//!
//! Invariants:
//! * an `event_batch` is acknowledged by its own frame id, with how many of
//!   its events were stored; events the daemon refused are counted at the
//!   daemon and reported as `rejected`, as the brain does for events it
//!   cannot take, so the agent's buffer never keeps a frame for ever;
//! * nothing a local agent sends reaches the brain except through the
//!   handler (events, health) or the router (command results).

use crate::protocol::{InboundFrame, SigningKey, Value};

/// The interval the gateway asks agents to report at, as the brain does
/// (`hello_ack.heartbeat_interval_seconds`).
pub const HEARTBEAT_INTERVAL_SECONDS: u64 = 10;

/// What one verified frame from a local agent amounts to.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    /// A local message for the handler.
    Local(Value),
    /// Loss counters the agent reports of its own buffer (`telemetry_loss`),
    /// besides the local message, if any, of the same frame.
    Loss(LossReport, Option<Value>),
    /// Nothing to do: the frame is taken and has no effect here
    /// (`command_ack`: the daemon acknowledged the command to the brain
    /// already; `registry_delta`, `error`: the brain only logs them).
    Taken,
    /// The brain would close the connection over it: with this code and why.
    Close(u16, String),
}

/// An agent's own loss counters: cumulative over its buffer's life.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LossReport {
    /// The agent's buffer, whose counters these are.
    pub buffer_id: String,
    /// Events inside frames the agent's buffer lost.
    pub events: u64,
    /// Per adapter, events the agent lost before its buffer.
    pub adapter_events: Vec<(String, u64)>,
}

/// The ack id of a translated `event_batch`: its frame id and how many
/// events it carried, which the `event_batch_ack` reports.
fn batch_ack_id(frame_id: &str, events: usize) -> Value {
    Value::Array(vec![Value::from(frame_id), Value::from(events as u64)])
}

/// A verified frame from a local agent, as the daemon takes it.
pub fn inbound(frame: InboundFrame) -> Inbound {
    let InboundFrame {
        frame_type,
        id,
        mut payload,
        ..
    } = frame;
    // The brain acknowledges a frame by its id cut to 64 characters.
    let id: String = id.chars().take(64).collect();
    match frame_type.as_str() {
        "event_batch" => match payload.remove("events") {
            Some(Value::Array(events)) => {
                let mut m = Value::empty_map();
                m.insert("type", "events");
                m.insert("ack_id", batch_ack_id(&id, events.len()));
                m.insert("events", Value::Array(events));
                Inbound::Local(m)
            }
            other => Inbound::Close(
                1011,
                format!(
                    "event_batch: payload.events must be a list, got {}",
                    other.map_or("nothing", |v| v.type_name())
                ),
            ),
        },
        "heartbeat" => {
            let health = payload
                .remove("adapter_health")
                .filter(|h| !h.is_null())
                .map(health_message);
            match loss_report(&payload) {
                Ok(Some(loss)) => Inbound::Loss(loss, health),
                Ok(None) => health.map_or(Inbound::Taken, Inbound::Local),
                Err(why) => Inbound::Close(1011, why),
            }
        }
        "agent_status" => match loss_report(&payload) {
            Ok(Some(loss)) => Inbound::Loss(loss, None),
            Ok(None) => Inbound::Taken,
            Err(why) => Inbound::Close(1011, why),
        },
        "command_result" => {
            let mut m = Value::empty_map();
            m.insert("type", "command_result");
            m.insert("id", id);
            for key in ["status", "result", "error"] {
                if let Some(v) = payload.remove(key) {
                    m.insert(key, v);
                }
            }
            Inbound::Local(m)
        }
        "command_ack" | "registry_delta" | "error" => Inbound::Taken,
        other => Inbound::Close(
            1011,
            format!("unknown frame type {}", crate::refusal::excerpt(other)),
        ),
    }
}

/// A heartbeat's `adapter_health` (`"<engine>.<key>"` -> string, the
/// documents JSON inside their strings) as the local `health` message.
/// Keys without an engine and documents that are not JSON objects are
/// left for the handler to refuse (and count).
pub fn health_message(adapter_health: Value) -> Value {
    let mut engines: Vec<(String, Value)> = Vec::new();
    if let Value::Map(entries) = adapter_health {
        for (key, value) in entries {
            let Some((engine, field)) = key.split_once('.') else {
                continue;
            };
            let (field, value) = match field {
                "queue_depths" => ("queue_depths", parse_document(value)),
                "worker_details" => ("workers", parse_document(value)),
                fact => (fact, value),
            };
            let report = match engines.iter_mut().find(|(e, _)| e == engine) {
                Some((_, r)) => r,
                None => {
                    engines.push((engine.to_string(), Value::empty_map()));
                    &mut engines.last_mut().expect("just pushed").1
                }
            };
            report.insert(field, value);
        }
    }
    let mut m = Value::empty_map();
    m.insert("type", "health");
    m.insert("interval_seconds", HEARTBEAT_INTERVAL_SECONDS);
    m.insert("engines", Value::Map(engines));
    m
}

/// A JSON document inside a string, parsed; anything else as it came.
fn parse_document(v: Value) -> Value {
    match &v {
        Value::Str(s) => crate::protocol::json::parse(s.as_bytes()).unwrap_or(v),
        _ => v,
    }
}

/// The agent's own `telemetry_loss`, when the frame carries one. The brain
/// closes the connection (1011) over one that is not an object.
fn loss_report(payload: &Value) -> Result<Option<LossReport>, String> {
    let loss = match payload.get("telemetry_loss") {
        None | Some(Value::Null) => return Ok(None),
        Some(l @ Value::Map(_)) => l,
        Some(other) => {
            return Err(format!(
                "telemetry_loss must be an object, got {}",
                other.type_name()
            ))
        }
    };
    // Within the brain's bounds (z4j-core's TelemetryLossPayload), which
    // also bound what the daemon remembers per agent buffer.
    let name = |k: &str| {
        loss.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.chars().count() <= 64)
            .map(str::to_owned)
            .ok_or_else(|| format!("telemetry_loss.{k} must be a string of 1-64 characters"))
    };
    let buffer_id = name("buffer_id")?;
    name("runtime_id")?;
    let adapters = match loss.get("adapter_events") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Map(m)) if m.len() <= 32 => m.as_slice(),
        Some(_) => {
            return Err(
                "telemetry_loss.adapter_events must be an object of at most 32 entries".into(),
            )
        }
    };
    let mut adapter_events = Vec::new();
    for (k, v) in adapters {
        if k.is_empty() || k.chars().count() > 64 {
            return Err("telemetry_loss.adapter_events names must be 1-64 characters".into());
        }
        let n = v
            .as_u64()
            .ok_or("telemetry_loss.adapter_events counts must be whole numbers >= 0")?;
        if n > 0 {
            adapter_events.push((k.clone(), n));
        }
    }
    Ok(Some(LossReport {
        buffer_id,
        // The events inside the frames the agent's buffer lost (its frame
        // counters also count heartbeats and command results).
        events: loss
            .get("event_records")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        adapter_events,
    }))
}

/// What a reply to the local agent becomes: a signed frame's type, id and
/// payload, or nothing (the reply has no counterpart the brain would send).
#[derive(Debug, PartialEq)]
pub struct Outbound {
    /// The frame's `type`.
    pub frame_type: &'static str,
    /// The frame's `id`.
    pub id: String,
    /// The frame's `payload`.
    pub payload: Value,
}

/// A reply the daemon would send a socket client, as the frame the brain
/// would send a z4j agent; `None` when there is none (`error` replies are
/// counted and logged by the daemon: a z4j agent has no use for them).
/// `key` is the project's signing key, which the brain's purge
/// confirmation is made with.
pub fn outbound(reply: &Value, key: &SigningKey) -> Option<Outbound> {
    match reply.get("type")?.as_str()? {
        "ack" => {
            let Some([Value::Str(id), n]) = reply.get("ack_id").and_then(Value::as_array) else {
                return None;
            };
            let received = n.as_u64()?;
            let accepted = reply.get("stored").and_then(Value::as_u64).unwrap_or(0);
            let mut p = Value::empty_map();
            p.insert("acked_id", id.as_str());
            p.insert("received", received);
            p.insert("accepted", accepted);
            p.insert("rejected", received.saturating_sub(accepted));
            Some(Outbound {
                frame_type: "event_batch_ack",
                id: format!("eba_{id}").chars().take(64).collect(),
                payload: p,
            })
        }
        "command" => {
            let id = reply.get("id")?.as_str()?.to_string();
            let mut p = Value::empty_map();
            for k in ["action", "target", "parameters"] {
                p.insert(k, reply.get(k).cloned().unwrap_or(Value::Null));
            }
            if reply.get("action").and_then(Value::as_str) == Some("purge_queue") {
                brain_purge_parameters(&mut p, key);
            }
            // z4j agents read a whole number of seconds; never round a
            // budget up past what the daemon gives.
            let budget = reply
                .get("timeout_seconds")
                .and_then(Value::as_f64)
                .map_or(1, |s| s.floor().max(1.0) as u64);
            p.insert("timeout_seconds", budget);
            p.insert("issued_by", Value::Null);
            p.insert("delivery_claim_token", Value::Null);
            Some(Outbound {
                frame_type: "command",
                id,
                payload: p,
            })
        }
        _ => None,
    }
}

/// A checked `purge_queue` in the brain's shape again: the daemon gives
/// local processes the confirmed depth (`expected_depth`) instead of the
/// brain's `confirm_token`, but a z4j agent checks the token itself, as
/// from the brain, so it gets the token of that same depth back (made
/// with the project's key, which the agent holds too).
fn brain_purge_parameters(payload: &mut Value, key: &SigningKey) {
    let Some(params) = payload.get_mut("parameters") else {
        return;
    };
    let Some(depth) = params.remove("expected_depth").and_then(|d| d.as_u64()) else {
        return;
    };
    let Some(queue) = params
        .get("queue")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return;
    };
    params.insert(
        "confirm_token",
        crate::commands::purge::token(key, &queue, depth),
    );
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
