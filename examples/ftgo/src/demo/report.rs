//! The end of a run: one JSON object (`--json`) or a summary table, both on stdout.

use super::live::{Live, Outage, Placement, quantile_ms};
use super::plan::Kind;
use super::track::Verdict;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// Problems listed at most.
const MAX_PROBLEMS: usize = 20;

/// What `ftgo demo --json` prints.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// Every order reached its expected state exactly once (the exit code is 0).
    pub(crate) ok: bool,
    pub(crate) orders: u32,
    pub(crate) validated: u32,
    pub(crate) rejected: u32,
    /// Accepted orders not in a final state when the demo stopped waiting.
    pub(crate) pending: u32,
    /// `POST /orders` answered other than 202 PENDING, or not at all.
    pub(crate) failed_requests: u32,
    /// Orders that did not reach their expected state exactly once (failed POSTs and
    /// pending orders included).
    pub(crate) unexpected: u32,
    pub(crate) expected_validated: u32,
    pub(crate) expected_rejected: u32,
    pub(crate) post_orders_p50_ms: Option<f64>,
    pub(crate) post_orders_p99_ms: Option<f64>,
    pub(crate) post_orders_max_ms: Option<f64>,
    /// Orders placed while consumer-service was down.
    pub(crate) orders_during_outage: u32,
    pub(crate) post_orders_p99_ms_during_outage: Option<f64>,
    /// From the kill to the restarted service listening (0 without an outage).
    pub(crate) outage_seconds: f64,
    /// Orders placed before consumer-service listened again and not final then (as the
    /// polling saw it: a rejection by restaurant-service may be seen a little late).
    pub(crate) backlog_at_restart: u32,
    /// From the restart until the last order of that backlog was seen final.
    pub(crate) backlog_drain_seconds: Option<f64>,
    /// Event streams (`GET /orders/{id}/events`) read and checked.
    pub(crate) event_streams_checked: u32,
    /// The whole run.
    pub(crate) seconds: f64,
    /// Orders per second offered outside the outage.
    pub(crate) rate: f64,
    pub(crate) broker: String,
    pub(crate) dir: String,
    /// The first problems, one line each.
    pub(crate) problems: Vec<String>,
}

/// Orders of each rejection kind, for the summary.
fn rejected_kinds(live: &Live) -> BTreeMap<Kind, u32> {
    let mut kinds = BTreeMap::new();
    for o in live.orders().iter().filter(|o| o.spec.kind != Kind::Valid) {
        *kinds.entry(o.spec.kind).or_insert(0) += 1;
    }
    kinds
}

impl Report {
    /// Sum up the run.
    pub(crate) fn new(
        live: &Live,
        verdict: &Verdict,
        extra_problems: Vec<String>,
        broker: &str,
        dir: &str,
        rate: f64,
    ) -> Self {
        let s = live.snapshot();
        let (all, outage) = live.latencies();
        let orders = live.orders();
        let (outage_seconds, restarted) = match live.outage() {
            Outage::None => (0.0, None),
            Outage::Down { since } => (since.elapsed().as_secs_f64(), None),
            Outage::Over { since, until } => (
                until.saturating_duration_since(since).as_secs_f64(),
                Some(until),
            ),
        };
        let final_at = |o: &super::live::OrderRecord| o.seen.as_ref().and_then(|s| s.terminal_at);
        let accepted = || {
            orders
                .iter()
                .filter(|o| matches!(o.placement, Placement::Accepted { .. }))
        };
        // The backlog: orders placed before the restart and not final then.
        let backlog = |r: Instant| {
            accepted()
                .filter(move |o| o.sent_at.is_some_and(|t| t < r))
                .filter(move |o| final_at(o).is_none_or(|t| t > r))
        };
        let backlog_at_restart = restarted.map_or(0, |r| backlog(r).count() as u32);
        let backlog_drain_seconds = restarted.filter(|_| s.pending == 0).map(|r| {
            let last: Option<Instant> = backlog(r).filter_map(final_at).max();
            last.map_or(0.0, |t| t.saturating_duration_since(r).as_secs_f64())
        });
        let mut problems: Vec<String> = extra_problems;
        problems.extend(verdict.unexpected.values().cloned());
        let more = problems.len().saturating_sub(MAX_PROBLEMS);
        problems.truncate(MAX_PROBLEMS);
        if more > 0 {
            problems.push(format!("… and {more} more"));
        }
        let expected_validated =
            orders.iter().filter(|o| o.spec.kind == Kind::Valid).count() as u32;
        let unexpected = verdict.unexpected.len() as u32;
        Self {
            ok: unexpected == 0 && s.failed == 0 && s.pending == 0 && problems.is_empty(),
            orders: s.total,
            validated: s.validated,
            rejected: s.rejected,
            pending: s.pending,
            failed_requests: s.failed,
            unexpected,
            expected_validated,
            expected_rejected: s.total - expected_validated,
            post_orders_p50_ms: quantile_ms(&all, 0.5),
            post_orders_p99_ms: quantile_ms(&all, 0.99),
            post_orders_max_ms: quantile_ms(&all, 1.0),
            orders_during_outage: orders.iter().filter(|o| o.during_outage).count() as u32,
            post_orders_p99_ms_during_outage: quantile_ms(&outage, 0.99),
            outage_seconds: round(outage_seconds),
            backlog_at_restart,
            backlog_drain_seconds: backlog_drain_seconds.map(round),
            event_streams_checked: verdict.streams_checked,
            seconds: round(live.started.elapsed().as_secs_f64()),
            rate,
            broker: broker.to_owned(),
            dir: dir.to_owned(),
            problems,
        }
    }

    /// The summary table, for a person.
    pub(crate) fn table(&self, live: &Live) -> String {
        let ms = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.1} ms"));
        let kinds: Vec<String> = rejected_kinds(live)
            .into_iter()
            .map(|(k, n)| format!("{n} {}", k.label()))
            .collect();
        let mut rows: Vec<(&str, String, String)> = vec![
            (
                "orders",
                self.orders.to_string(),
                format!("{} failed POST /orders", self.failed_requests),
            ),
            (
                "validated",
                self.validated.to_string(),
                format!("expected {}", self.expected_validated),
            ),
            (
                "rejected",
                self.rejected.to_string(),
                format!("expected {}: {}", self.expected_rejected, kinds.join(", ")),
            ),
            ("pending", self.pending.to_string(), String::new()),
            (
                "POST /orders",
                format!("p99 {}", ms(self.post_orders_p99_ms)),
                format!(
                    "p50 {}, max {}",
                    ms(self.post_orders_p50_ms),
                    ms(self.post_orders_max_ms)
                ),
            ),
        ];
        if self.outage_seconds > 0.0 {
            rows.push((
                "… during outage",
                format!("p99 {}", ms(self.post_orders_p99_ms_during_outage)),
                format!(
                    "{} orders placed while consumer-service was down",
                    self.orders_during_outage
                ),
            ));
            rows.push((
                "outage",
                format!("{:.1} s", self.outage_seconds),
                "consumer-service killed (kill -9), then restarted".to_owned(),
            ));
            let drain = self
                .backlog_drain_seconds
                .map_or("–".to_owned(), |d| format!("{d:.1} s"));
            let rate = match self.backlog_drain_seconds {
                Some(d) if d > 0.0 => {
                    format!(", {:.0} orders/s", f64::from(self.backlog_at_restart) / d)
                }
                _ => String::new(),
            };
            rows.push((
                "backlog drained",
                drain,
                format!(
                    "{} orders open at the restart{rate}",
                    self.backlog_at_restart
                ),
            ));
        }
        rows.push((
            "exactly once",
            format!("{}/{}", self.event_streams_checked, self.orders),
            "event streams PENDING → … → final state, once".to_owned(),
        ));
        rows.push((
            "total",
            format!("{:.1} s", self.seconds),
            format!("broker {}", self.broker),
        ));
        let verdict = if self.ok {
            "OK: every order reached its expected state exactly once".to_owned()
        } else {
            format!(
                "FAILED: {} orders did not reach their expected state",
                self.unexpected
            )
        };
        let mut out = format!("\nftgo demo — {verdict}\n\n");
        for (name, value, note) in rows {
            out.push_str(&format!("  {name:<17} {value:>12}   {note}\n").replace("   \n", "\n"));
        }
        if !self.problems.is_empty() {
            out.push_str("\nproblems:\n");
            for p in &self.problems {
                out.push_str(&format!("  - {p}\n"));
            }
        }
        out
    }
}

/// Three decimals are plenty.
fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
