use super::*;
use crate::protocol::json;

fn frame(frame_type: &str, id: &str, payload: &str) -> InboundFrame {
    InboundFrame {
        frame_type: frame_type.into(),
        id: id.into(),
        seq: 1,
        ts: "2026-12-07T00:00:00Z".into(),
        payload: json::parse(payload.as_bytes()).unwrap(),
    }
}

fn key() -> SigningKey {
    // The protocol's test vector key (z4j-protocol section 4.4).
    SigningKey::from_base64("mVtpP-Iz85lBRJdiBbQ9KzZo4cCi7lxIHt-j7T6yOGU=").unwrap()
}

fn local(i: Inbound) -> Value {
    match i {
        Inbound::Local(v) => v,
        other => panic!("expected a local message, got {other:?}"),
    }
}

#[test]
fn an_event_batch_becomes_events_acked_by_frame_id_and_count() {
    let m = local(inbound(frame(
        "event_batch",
        "ev_1",
        r#"{"events":[{"engine":"celery","kind":"task.received","task_id":"t"}]}"#,
    )));
    assert_eq!(m.get("type").and_then(Value::as_str), Some("events"));
    assert_eq!(m.get("events").and_then(Value::as_array).unwrap().len(), 1);
    let mut ack = Value::empty_map();
    ack.insert("type", "ack");
    ack.insert("ack_id", m.get("ack_id").unwrap().clone());
    ack.insert("stored", 1u64);
    let out = outbound(&ack, &key()).unwrap();
    assert_eq!(out.frame_type, "event_batch_ack");
    assert_eq!(out.id, "eba_ev_1");
    assert_eq!(
        String::from_utf8(crate::protocol::canonical::to_vec(&out.payload).unwrap()).unwrap(),
        r#"{"accepted":1,"acked_id":"ev_1","received":1,"rejected":0}"#
    );
}

#[test]
fn events_the_daemon_refused_are_acked_as_rejected() {
    let mut ack = Value::empty_map();
    ack.insert("type", "ack");
    ack.insert("ack_id", Value::Array(vec!["ev_2".into(), 3u64.into()]));
    ack.insert("stored", 1u64);
    let p = outbound(&ack, &key()).unwrap().payload;
    assert_eq!(p.get("rejected").and_then(Value::as_u64), Some(2));
    assert_eq!(p.get("accepted").and_then(Value::as_u64), Some(1));
}

#[test]
fn an_event_batch_without_a_list_closes_like_the_brain() {
    match inbound(frame("event_batch", "ev_3", r#"{"events":{}}"#)) {
        Inbound::Close(1011, why) => assert!(why.contains("must be a list"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn adapter_health_documents_become_the_local_health_report() {
    let m = local(inbound(frame(
        "heartbeat",
        "hb",
        r#"{"buffer_size":0,"adapter_health":{
            "celery.queue_depths":"{\"default\": 3}",
            "celery.worker_details":"{\"celery@h\": {\"stats\": {\"pid\": 7}}}",
            "celery.broker_type":"redis",
            "nodot":"x"}}"#,
    )));
    assert_eq!(m.get("interval_seconds").and_then(Value::as_u64), Some(10));
    let celery = m.get("engines").unwrap().get("celery").unwrap();
    assert_eq!(
        celery
            .get("queue_depths")
            .unwrap()
            .get("default")
            .and_then(Value::as_u64),
        Some(3)
    );
    let w = celery.get("workers").unwrap().get("celery@h").unwrap();
    assert_eq!(
        w.get("stats").unwrap().get("pid").and_then(Value::as_u64),
        Some(7)
    );
    assert_eq!(
        celery.get("broker_type").and_then(Value::as_str),
        Some("redis")
    );
    assert_eq!(m.get("engines").unwrap().as_map().unwrap().len(), 1);
}

#[test]
fn a_heartbeat_without_adapter_health_is_taken_and_reports_nothing() {
    assert_eq!(
        inbound(frame("heartbeat", "hb", r#"{"buffer_size":0}"#)),
        Inbound::Taken
    );
    assert_eq!(
        inbound(frame("heartbeat", "hb", r#"{"adapter_health":null}"#)),
        Inbound::Taken
    );
}

#[test]
fn the_agents_own_losses_are_reported_with_its_buffer() {
    let got = inbound(frame(
        "agent_status",
        "as",
        r#"{"telemetry_loss":{"buffer_id":"b1","runtime_id":"r","capacity_evicted_frames":2,
            "content_rejected_frames":1,"event_records":3,"adapter_events":{"celery":4,"rq":0}}}"#,
    ));
    assert_eq!(
        got,
        Inbound::Loss(
            LossReport {
                buffer_id: "b1".into(),
                events: 3,
                adapter_events: vec![("celery".into(), 4)],
            },
            None
        )
    );
    for bad in [
        r#"{"telemetry_loss":[1]}"#,
        r#"{"telemetry_loss":{"runtime_id":"r"}}"#,
        r#"{"telemetry_loss":{"buffer_id":"b","runtime_id":""}}"#,
        r#"{"telemetry_loss":{"buffer_id":"b","runtime_id":"r","adapter_events":{"celery":-1}}}"#,
    ] {
        match inbound(frame("agent_status", "as", bad)) {
            Inbound::Close(1011, _) => {}
            other => panic!("{bad}: {other:?}"),
        }
    }
    let long = format!(
        r#"{{"telemetry_loss":{{"buffer_id":"{}","runtime_id":"r"}}}}"#,
        "b".repeat(65)
    );
    assert!(matches!(
        inbound(frame("agent_status", "as", &long)),
        Inbound::Close(1011, _)
    ));
}

#[test]
fn a_command_result_keeps_the_command_id_and_answer() {
    let m = local(inbound(frame(
        "command_result",
        "5f0c7a8e-0000-4000-8000-000000000001",
        r#"{"status":"success","result":{"ok":true},"error":null,"delivery_claim_token":null}"#,
    )));
    assert_eq!(
        String::from_utf8(crate::protocol::canonical::to_vec(&m).unwrap()).unwrap(),
        r#"{"error":null,"id":"5f0c7a8e-0000-4000-8000-000000000001","result":{"ok":true},"status":"success","type":"command_result"}"#
    );
}

#[test]
fn control_frames_without_effect_are_taken_and_unknown_types_close() {
    for t in ["command_ack", "registry_delta", "error"] {
        assert_eq!(inbound(frame(t, "x", "{}")), Inbound::Taken, "{t}");
    }
    assert!(matches!(
        inbound(frame("bogus", "x", "{}")),
        Inbound::Close(1011, _)
    ));
}

#[test]
fn a_command_goes_out_as_the_brain_sends_it_with_a_whole_budget() {
    let cmd = json::parse(
        br#"{"type":"command","id":"c-1","action":"cancel_task",
            "target":{"type":"task","id":"celery:t","engine":"celery"},
            "parameters":{"engine":"celery","task_id":"t"},"timeout_seconds":54.9}"#,
    )
    .unwrap();
    let out = outbound(&cmd, &key()).unwrap();
    assert_eq!(out.frame_type, "command");
    assert_eq!(out.id, "c-1");
    assert_eq!(
        String::from_utf8(crate::protocol::canonical::to_vec(&out.payload).unwrap()).unwrap(),
        r#"{"action":"cancel_task","delivery_claim_token":null,"issued_by":null,"parameters":{"engine":"celery","task_id":"t"},"target":{"engine":"celery","id":"celery:t","type":"task"},"timeout_seconds":54}"#
    );
}

#[test]
fn replies_without_a_brain_counterpart_are_not_sent() {
    for r in [
        r#"{"type":"error","code":"unknown_kind","message":"m","ack_id":["ev",1]}"#,
        r#"{"type":"pong"}"#,
        r#"{"type":"ack","ack_id":7}"#,
    ] {
        assert_eq!(
            outbound(&json::parse(r.as_bytes()).unwrap(), &key()),
            None,
            "{r}"
        );
    }
}

#[test]
fn a_checked_purge_goes_to_a_z4j_agent_with_the_brains_confirm_token() {
    let cmd = json::parse(
        br#"{"type":"command","id":"c-2","action":"purge_queue",
            "target":{"type":"queue","id":"default","engine":"rq"},
            "parameters":{"queue":"default","engine":"rq","expected_depth":3,"force":false},
            "timeout_seconds":54}"#,
    )
    .unwrap();
    let p = outbound(&cmd, &key()).unwrap().payload;
    let params = p.get("parameters").unwrap();
    assert_eq!(params.get("expected_depth"), None);
    assert_eq!(
        params.get("confirm_token").and_then(Value::as_str),
        Some(crate::commands::purge::token(&key(), "default", 3).as_str())
    );
    // Independent of the daemon's own function: HMAC-SHA256 of the text.
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(
        &hex::decode("995b693fe233f3994144976205b43d2b3668e1c0a2ee5c481edfa3ed3eb23865").unwrap(),
    )
    .unwrap();
    mac.update(b"purge|default|3");
    assert_eq!(
        params.get("confirm_token").and_then(Value::as_str),
        Some(hex::encode(mac.finalize().into_bytes()).as_str())
    );
    let forced = json::parse(
        br#"{"type":"command","id":"c-3","action":"purge_queue","target":{},
            "parameters":{"queue":"default","force":true},"timeout_seconds":54}"#,
    )
    .unwrap();
    let p = outbound(&forced, &key()).unwrap().payload;
    assert_eq!(p.get("parameters").unwrap().get("confirm_token"), None);
}

#[test]
fn a_frame_id_over_64_characters_is_acked_by_its_first_64_as_the_brain_does() {
    let long = "e".repeat(100);
    let m = local(inbound(frame("event_batch", &long, r#"{"events":[]}"#)));
    let ack_id = m.get("ack_id").and_then(Value::as_array).unwrap();
    assert_eq!(ack_id[0].as_str().map(str::len), Some(64));
}
