use super::*;

const ACK: Duration = Duration::from_secs(10);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn send(w: &mut Window, id: &str, range: (i64, i64), at: Instant) {
    let events = (range.1 - range.0 + 1) as usize;
    w.sent(id.to_string(), range, events, true, at);
}

#[test]
fn an_ack_for_an_old_copy_settles_the_range() {
    let t0 = Instant::now();
    let mut w = Window::new(ACK, t0);
    send(&mut w, "ev_a", (1, 10), t0);
    let r = w.overdue(t0 + ACK).expect("late after the ack timeout");
    w.resent(&r, "ev_b".into(), 10, t0 + ACK);
    let settled = w
        .ack("ev_a", t0 + ACK + secs(1))
        .expect("the old copy is known");
    assert_eq!((settled.first_id, settled.last_id), (1, 10));
    assert_eq!(settled.latency, ACK + secs(1), "from the first copy");
    assert!(settled.first_delivery, "the first copy was acked");
    assert!(w.is_empty());
    assert_eq!(w.ack("ev_b", t0 + ACK + secs(2)), None, "already settled");
}

#[test]
fn an_ack_for_a_newer_copy_counts_rejections_as_duplicates() {
    let t0 = Instant::now();
    let mut w = Window::new(ACK, t0);
    send(&mut w, "ev_a", (1, 4), t0);
    let r = w.overdue(t0 + ACK).unwrap();
    w.resent(&r, "ev_b".into(), 4, t0 + ACK);
    let settled = w.ack("ev_b", t0 + ACK + secs(1)).unwrap();
    assert!(!settled.first_delivery);
    assert_eq!(settled.rejected(4), Rejected::Duplicates(4));
    assert_eq!(settled.rejected(0), Rejected::None);
}

#[test]
fn rejections_on_a_first_delivery_are_refusals_capped_at_the_range() {
    let t0 = Instant::now();
    let mut w = Window::new(ACK, t0);
    send(&mut w, "ev_a", (1, 3), t0);
    let settled = w.ack("ev_a", t0 + secs(1)).unwrap();
    assert_eq!(settled.rejected(2), Rejected::Refused(2));
    assert_eq!(settled.rejected(99), Rejected::Refused(3));
    // A range that may have reached the brain from an earlier process.
    let mut w = Window::new(ACK, t0);
    w.sent("ev_c".into(), (4, 5), 2, false, t0);
    assert_eq!(
        w.ack("ev_c", t0 + secs(1)).unwrap().rejected(1),
        Rejected::Duplicates(1)
    );
}

#[test]
fn the_wait_doubles_per_resend_and_caps_at_sixteen_times() {
    let w = Window::new(ACK, Instant::now());
    let waits: Vec<u64> = (0..7).map(|n| w.ack_wait(n).as_secs()).collect();
    assert_eq!(waits, vec![10, 20, 40, 80, 160, 160, 160]);
}

#[test]
fn timeouts_back_off_from_the_last_copy() {
    let t0 = Instant::now();
    let mut w = Window::new(ACK, t0);
    send(&mut w, "ev_a", (1, 1), t0);
    assert_eq!(w.overdue(t0 + ACK - secs(1)), None);
    let mut at = t0;
    for (n, wait) in [10u64, 20, 40, 80, 160, 160].into_iter().enumerate() {
        let due = at + secs(wait);
        assert_eq!(
            w.overdue(due - secs(1)),
            None,
            "re-send {n} not before {wait} s"
        );
        let r = w
            .overdue(due)
            .unwrap_or_else(|| panic!("re-send {n} due after {wait} s"));
        assert_eq!(r.resends, n as u32);
        assert!(!r.skipped);
        w.resent(&r, format!("ev_{n}"), 1, due);
        at = due;
    }
}

#[test]
fn only_the_front_range_times_out() {
    let t0 = Instant::now();
    let mut w = Window::new(ACK, t0);
    send(&mut w, "ev_a", (1, 1), t0);
    send(&mut w, "ev_b", (2, 2), t0);
    send(&mut w, "ev_c", (3, 3), t0 + secs(1));
    let r = w.overdue(t0 + ACK).unwrap();
    assert_eq!((r.index, r.first_id), (0, 1));
    w.resent(&r, "ev_a2".into(), 1, t0 + ACK);
    // The ones behind are long past their own timeout, but wait their turn.
    assert_eq!(w.overdue(t0 + ACK + secs(9)), None);
    let r = w.overdue(t0 + ACK + ACK * 2).unwrap();
    assert_eq!(
        r.first_id, 1,
        "still the front range, now on its doubled wait"
    );
}

#[test]
fn an_ack_restarts_the_front_range_clock() {
    let t0 = Instant::now();
    let mut w = Window::new(ACK, t0);
    send(&mut w, "ev_a", (1, 1), t0);
    send(&mut w, "ev_b", (2, 2), t0);
    w.ack("ev_a", t0 + secs(2)).unwrap();
    // ev_b went out at t0, but the brain showed progress at 2 s.
    assert_eq!(w.overdue(t0 + secs(11)), None);
    assert_eq!(w.overdue(t0 + secs(12)).map(|r| r.first_id), Some(2));
}

#[test]
fn skipped_ranges_go_again_after_two_seconds() {
    let t0 = Instant::now();
    let mut w = Window::new(ACK, t0);
    send(&mut w, "ev_a", (1, 1), t0);
    send(&mut w, "ev_b", (2, 2), t0 + secs(1));
    // The brain acks the later frame: it passed over ev_a.
    let acked = t0 + secs(2);
    w.ack("ev_b", acked).unwrap();
    assert_eq!(
        w.overdue(acked + SKIPPED_GRACE - Duration::from_millis(1)),
        None
    );
    let r = w
        .overdue(acked + SKIPPED_GRACE)
        .expect("skipped range comes back");
    assert!(r.skipped);
    assert_eq!(r.first_id, 1);
    w.resent(&r, "ev_a2".into(), 1, acked + SKIPPED_GRACE);
    assert_eq!(
        w.overdue(acked + SKIPPED_GRACE + secs(1)),
        None,
        "a re-sent range is no longer skipped"
    );
}

#[test]
fn a_range_sent_after_the_acked_copy_is_not_skipped() {
    let t0 = Instant::now();
    let mut w = Window::new(ACK, t0);
    send(&mut w, "ev_a", (1, 1), t0);
    send(&mut w, "ev_b", (2, 2), t0 + secs(1));
    w.ack("ev_a", t0 + secs(2)).unwrap();
    assert_eq!(w.overdue(t0 + secs(5)), None);
}

#[test]
fn the_brains_frame_time_is_smoothed_and_stretches_the_wait() {
    let t0 = Instant::now();
    let mut w = Window::new(ACK, t0);
    send(&mut w, "ev_a", (1, 1), t0);
    send(&mut w, "ev_b", (2, 2), t0 + secs(5));
    w.ack("ev_a", t0 + secs(20)).unwrap();
    assert_eq!(w.service_time(), Some(secs(20)));
    // Counted from the previous ack, not from when ev_b went out.
    w.ack("ev_b", t0 + secs(30)).unwrap();
    let smoothed = w.service_time().unwrap();
    let expected = secs(17); // 0.7 * 20 + 0.3 * 10
    assert!(
        smoothed.abs_diff(expected) < Duration::from_millis(1),
        "{smoothed:?}"
    );
    send(&mut w, "ev_c", (3, 3), t0 + secs(30));
    // Three frame times (51 s), not the 10 s ack timeout.
    assert_eq!(w.overdue(t0 + secs(30 + 50)), None);
    assert!(w
        .overdue(t0 + secs(30 + 51) + Duration::from_millis(1))
        .is_some());
}

#[test]
fn a_very_slow_brain_still_times_out_at_the_backoff_cap() {
    let t0 = Instant::now();
    let mut w = Window::new(ACK, t0);
    send(&mut w, "ev_a", (1, 1), t0);
    w.ack("ev_a", t0 + secs(3600)).unwrap();
    send(&mut w, "ev_b", (2, 2), t0 + secs(3600));
    let cap = ACK * MAX_RESEND_BACKOFF;
    assert_eq!(w.overdue(t0 + secs(3600) + cap - secs(1)), None);
    assert!(w.overdue(t0 + secs(3600) + cap).is_some());
}

#[test]
fn the_first_copy_is_forgotten_past_the_copy_limit() {
    let t0 = Instant::now();
    let mut w = Window::new(ACK, t0);
    send(&mut w, "ev_0", (1, 1), t0);
    let mut at = t0;
    for n in 1..MAX_COPIES {
        at += secs(200);
        let r = w.overdue(at).unwrap();
        w.resent(&r, format!("ev_{n}"), 1, at);
    }
    at += secs(200);
    let r = w.overdue(at).unwrap();
    w.resent(&r, "ev_last".into(), 1, at);
    assert_eq!(
        w.ack("ev_0", at),
        None,
        "the oldest copy is no longer known"
    );
    let settled = w.ack("ev_1", at).expect("the next oldest still is");
    assert!(!settled.first_delivery);
}

#[test]
fn evicted_ranges_leave_the_window() {
    let t0 = Instant::now();
    let mut w = Window::new(ACK, t0);
    send(&mut w, "ev_a", (1, 1), t0);
    send(&mut w, "ev_b", (2, 2), t0);
    let r = w.overdue(t0 + ACK).unwrap();
    w.evicted(&r);
    assert_eq!(w.len(), 1);
    assert_eq!(w.overdue(t0 + ACK * 2).map(|r| r.first_id), Some(2));
}

#[test]
fn first_sends_and_resends_are_counted_across_sessions() {
    let mut f = Forwarded::default();
    // Ids up to 5 were in the spool at open: an earlier process may have sent them.
    let c = f.record([3, 4, 5, 6], 5);
    assert_eq!((c.first_sends, c.resends, c.first_delivery), (4, 0, false));
    let c = f.record([7, 8], 5);
    assert_eq!((c.first_sends, c.resends, c.first_delivery), (2, 0, true));
    // A new session sends from the start of what is left.
    let c = f.record([6, 7, 8, 9, 10], 5);
    assert_eq!((c.first_sends, c.resends, c.first_delivery), (2, 3, false));
    let c = f.record([9, 10], 5);
    assert_eq!((c.first_sends, c.resends, c.first_delivery), (0, 2, false));
    let c = f.record([11], 5);
    assert_eq!((c.first_sends, c.resends, c.first_delivery), (1, 0, true));
}
