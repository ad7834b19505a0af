//! Following the orders to their final state with `GET /orders/{id}` (only the pending
//! ones, a bounded number per round and at once, so polling does not crowd out
//! `POST /orders`), then checking each order: its final state and reason as expected, and
//! its event stream PENDING → … → final state, the final state exactly once.

use super::api::{Api, StateEvent};
use super::live::{Live, Outage, Placement};
use futures::StreamExt as _;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Polls `GET /orders/{id}` for pending orders.
#[derive(Debug, Clone)]
pub(crate) struct Tracker {
    pub(crate) api: Api,
    pub(crate) order_url: String,
    pub(crate) live: Arc<Live>,
}

impl Tracker {
    /// Poll up to `limit` pending orders, `concurrency` at a time, continuing after the
    /// previous round's last order.
    async fn round(&self, cursor: &mut u32, limit: usize, concurrency: usize) {
        let batch = self.live.pending_batch(*cursor, limit);
        if let Some((last, _)) = batch.last() {
            *cursor = *last;
        }
        futures::stream::iter(batch)
            .map(|(i, id)| async move { (i, self.api.order_state(&self.order_url, &id).await) })
            .buffer_unordered(concurrency)
            .for_each(|(i, r)| {
                // A failed poll is retried in a later round.
                if let Ok((state, reason)) = r {
                    self.live.seen(i, state, reason);
                }
                std::future::ready(())
            })
            .await;
    }

    /// While orders are being placed: 20 orders every 250 ms, two at a time (at most
    /// 80 light GETs a second next to the POSTs). Once consumer-service is back, the
    /// backlog is watched through its newest order: polled every 50 ms until final, then
    /// the next newer-to-older one at once, and so on, so the backlog's drain is seen
    /// within about 50 ms for a few GETs. Runs until dropped.
    pub(crate) async fn follow(self) {
        let mut cursor = 0;
        loop {
            if let Outage::Over { until, .. } = self.live.outage()
                && let Some((i, id)) = self.live.newest_pending_sent_before(until)
            {
                if let Ok((state, reason)) = self.api.order_state(&self.order_url, &id).await {
                    self.live.seen(i, state, reason);
                }
                if self
                    .live
                    .newest_pending_sent_before(until)
                    .is_some_and(|(j, _)| j == i)
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
            self.round(&mut cursor, 20, 2).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// After the last order was placed: every pending order each 100 ms, eight at a
    /// time, until none is pending (`true`) or `deadline` passes (`false`).
    pub(crate) async fn settle(&self, deadline: Instant) -> bool {
        let mut cursor = 0;
        loop {
            self.round(&mut cursor, usize::MAX, 8).await;
            if self.live.pending() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What the check found.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    /// Orders that did not reach their expected state exactly once, by index, with why.
    pub(crate) unexpected: BTreeMap<u32, String>,
    /// Event streams read.
    pub(crate) streams_checked: u32,
}

/// `events` goes PENDING → (at most one of CONSUMER_VALIDATED, ORDER_DETAILS_VALIDATED) →
/// `final_state`, each once; VALIDATED only after one of the two validations.
pub(crate) fn check_sequence(events: &[StateEvent], final_state: &str) -> Result<(), String> {
    let states: Vec<&str> = events.iter().map(|e| e.state.as_str()).collect();
    let shown = states.join(" → ");
    let terminal = |s: &&&str| **s == "VALIDATED" || **s == "REJECTED";
    if states.first() != Some(&"PENDING") {
        return Err(format!("its events do not start with PENDING: {shown}"));
    }
    let finals = states.iter().filter(terminal).count();
    if finals != 1 {
        return Err(format!(
            "{finals} final states instead of exactly one: {shown}"
        ));
    }
    if states.last() != Some(&final_state) {
        return Err(format!("its events do not end with {final_state}: {shown}"));
    }
    let middle = &states[1..states.len() - 1];
    let intermediate = |s: &&str| *s == "CONSUMER_VALIDATED" || *s == "ORDER_DETAILS_VALIDATED";
    if middle.len() > 1 || !middle.iter().all(intermediate) {
        return Err(format!(
            "unexpected states between PENDING and {final_state}: {shown}"
        ));
    }
    if final_state == "VALIDATED" && middle.is_empty() {
        return Err(format!("VALIDATED without a validation before it: {shown}"));
    }
    Ok(())
}

/// Check every order of `live`: placed, final state as expected, a rejection's reason
/// naming what is wrong, and (when `read_streams`) its event stream, read `concurrency`
/// at a time.
pub(crate) async fn verify(tracker: &Tracker, concurrency: usize, read_streams: bool) -> Verdict {
    let mut verdict = Verdict::default();
    let mut streams = Vec::new();
    for o in tracker.live.orders() {
        let (i, spec) = (o.spec.index, &o.spec);
        let what = format!("order #{i} ({})", spec.kind.label());
        let order_id = match &o.placement {
            Placement::NotYet => {
                verdict
                    .unexpected
                    .insert(i, format!("{what} was never placed"));
                continue;
            }
            Placement::Failed(why) => {
                verdict
                    .unexpected
                    .insert(i, format!("{what}: POST /orders failed: {why}"));
                continue;
            }
            Placement::Accepted { order_id } => order_id.clone(),
        };
        let expected = spec.kind.expected();
        let Some(seen) = o.seen.as_ref().filter(|s| s.terminal_at.is_some()) else {
            let state = o.seen.as_ref().map_or("PENDING", |s| s.state.as_str());
            verdict.unexpected.insert(
                i,
                format!("{what} {order_id} is still {state}, expected {expected}"),
            );
            continue;
        };
        let reason = seen.reason.clone().unwrap_or_default();
        if seen.state != expected {
            verdict.unexpected.insert(
                i,
                format!(
                    "{what} {order_id} ended {}, expected {expected} {reason}",
                    seen.state
                ),
            );
            continue;
        }
        if let Some(name) = &spec.reason_names
            && !reason.contains(name.as_str())
        {
            verdict.unexpected.insert(
                i,
                format!(
                    "{what} {order_id} was rejected for {reason:?}, expected a reason naming {name}"
                ),
            );
            continue;
        }
        if read_streams {
            streams.push((i, what, order_id, seen.state.clone()));
        }
    }
    let checked: Vec<(u32, Result<(), String>)> = futures::stream::iter(streams)
        .map(|(i, what, id, state)| async move {
            let r = match tracker.api.state_events(&tracker.order_url, &id).await {
                Ok(events) => check_sequence(&events, &state),
                Err(e) => Err(format!("cannot read its event stream: {e:#}")),
            };
            (i, r.map_err(|e| format!("{what} {id}: {e}")))
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    for (i, r) in checked {
        verdict.streams_checked += 1;
        if let Err(e) = r {
            verdict.unexpected.insert(i, e);
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(states: &[&str]) -> Vec<StateEvent> {
        states
            .iter()
            .map(|s| StateEvent {
                state: (*s).to_owned(),
                reason: None,
            })
            .collect()
    }

    #[test]
    fn accepts_the_paths_of_the_saga() {
        for (states, last) in [
            (
                &["PENDING", "CONSUMER_VALIDATED", "VALIDATED"][..],
                "VALIDATED",
            ),
            (
                &["PENDING", "ORDER_DETAILS_VALIDATED", "VALIDATED"][..],
                "VALIDATED",
            ),
            (&["PENDING", "REJECTED"][..], "REJECTED"),
            (
                &["PENDING", "ORDER_DETAILS_VALIDATED", "REJECTED"][..],
                "REJECTED",
            ),
        ] {
            assert_eq!(check_sequence(&events(states), last), Ok(()), "{states:?}");
        }
    }

    #[test]
    fn refuses_a_final_state_twice_or_out_of_order() {
        for (states, last) in [
            (
                &["PENDING", "CONSUMER_VALIDATED", "VALIDATED", "VALIDATED"][..],
                "VALIDATED",
            ),
            (&["PENDING", "REJECTED", "VALIDATED"][..], "VALIDATED"),
            (
                &["CONSUMER_VALIDATED", "PENDING", "VALIDATED"][..],
                "VALIDATED",
            ),
            (&["PENDING", "VALIDATED"][..], "VALIDATED"),
            (&["PENDING", "CONSUMER_VALIDATED"][..], "VALIDATED"),
            (&["PENDING", "REJECTED"][..], "VALIDATED"),
            (&[][..], "REJECTED"),
        ] {
            assert!(check_sequence(&events(states), last).is_err(), "{states:?}");
        }
    }
}
