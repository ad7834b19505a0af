//! What the demo knows while it runs: every order (its spec, how its `POST /orders`
//! went, its last seen state), the latency histograms and consumer-service's outage.
//! Shared by the placer, the tracker and the live view.

use super::plan::OrderSpec;
use hdrhistogram::Histogram;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How an order's `POST /orders` went.
#[derive(Debug, Clone)]
pub(crate) enum Placement {
    NotYet,
    /// 202 with this order id.
    Accepted {
        order_id: String,
    },
    /// Not 202, or no answer: why.
    Failed(String),
}

/// An order's state as last seen by `GET /orders/{id}`.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) state: String,
    pub(crate) reason: Option<String>,
    /// When it was first seen VALIDATED or REJECTED.
    pub(crate) terminal_at: Option<Instant>,
}

/// One order of the run.
#[derive(Debug, Clone)]
pub(crate) struct OrderRecord {
    pub(crate) spec: OrderSpec,
    pub(crate) placement: Placement,
    /// Placed while consumer-service was down.
    pub(crate) during_outage: bool,
    /// When its `POST /orders` was sent.
    pub(crate) sent_at: Option<Instant>,
    pub(crate) seen: Option<Seen>,
}

impl OrderRecord {
    /// Accepted and not yet seen in a final state.
    pub(crate) fn pending(&self) -> bool {
        matches!(self.placement, Placement::Accepted { .. })
            && self.seen.as_ref().is_none_or(|s| s.terminal_at.is_none())
    }

    /// The order id, once accepted.
    pub(crate) fn order_id(&self) -> Option<&str> {
        match &self.placement {
            Placement::Accepted { order_id } => Some(order_id),
            _ => None,
        }
    }
}

/// consumer-service's availability.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outage {
    /// Never killed.
    None,
    /// Killed at this instant, not back yet.
    Down { since: Instant },
    /// Was down from `since` to `until` (listening again).
    Over { since: Instant, until: Instant },
}

/// POST latencies in microseconds.
#[derive(Debug)]
pub(crate) struct Latencies {
    pub(crate) all: Histogram<u64>,
    pub(crate) during_outage: Histogram<u64>,
}

/// The shared state of a run.
#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) started: Instant,
    orders: Mutex<Vec<OrderRecord>>,
    latencies: Mutex<Latencies>,
    outage: Mutex<Outage>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A histogram of 1 µs to 10 min with 3 significant digits.
fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

/// A quantile in milliseconds, `None` without samples.
pub(crate) fn quantile_ms(h: &Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
}

/// Counts at one instant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Snapshot {
    pub(crate) total: u32,
    pub(crate) placed: u32,
    pub(crate) failed: u32,
    pub(crate) pending: u32,
    pub(crate) validated: u32,
    pub(crate) rejected: u32,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) outage: Outage,
}

impl Live {
    /// The run that started at `started`, with these orders to place.
    pub(crate) fn new(started: Instant, specs: Vec<OrderSpec>) -> anyhow::Result<Self> {
        let orders = specs
            .into_iter()
            .map(|spec| OrderRecord {
                spec,
                placement: Placement::NotYet,
                during_outage: false,
                sent_at: None,
                seen: None,
            })
            .collect();
        Ok(Self {
            started,
            orders: Mutex::new(orders),
            latencies: Mutex::new(Latencies {
                all: histogram()?,
                during_outage: histogram()?,
            }),
            outage: Mutex::new(Outage::None),
        })
    }

    pub(crate) fn spec(&self, i: u32) -> Option<OrderSpec> {
        lock(&self.orders).get(i as usize).map(|o| o.spec.clone())
    }

    /// Record how order `i`'s POST went and how long it took.
    pub(crate) fn placed(&self, i: u32, placement: Placement, during_outage: bool, took: Duration) {
        if let Some(o) = lock(&self.orders).get_mut(i as usize) {
            o.placement = placement;
            o.during_outage = during_outage;
            o.sent_at = Instant::now().checked_sub(took);
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let mut l = lock(&self.latencies);
        l.all.saturating_record(us);
        if during_outage {
            l.during_outage.saturating_record(us);
        }
    }

    /// Up to `limit` pending orders `(index, order id)`, starting after index `cursor`
    /// and wrapping around, so repeated rounds visit all of them.
    pub(crate) fn pending_batch(&self, cursor: u32, limit: usize) -> Vec<(u32, String)> {
        let orders = lock(&self.orders);
        let pending = |o: &&OrderRecord| o.pending();
        let ids = |o: &OrderRecord| o.order_id().map(|id| (o.spec.index, id.to_owned()));
        let after = orders.iter().skip(cursor as usize + 1).filter(pending);
        let before = orders.iter().take(cursor as usize + 1).filter(pending);
        after.chain(before).filter_map(ids).take(limit).collect()
    }

    /// Note order `i`'s state as `GET /orders/{id}` showed it.
    pub(crate) fn seen(&self, i: u32, state: String, reason: Option<String>) {
        let mut orders = lock(&self.orders);
        let Some(o) = orders.get_mut(i as usize) else {
            return;
        };
        let terminal = state == "VALIDATED" || state == "REJECTED";
        let terminal_at = match &o.seen {
            Some(Seen {
                terminal_at: Some(t),
                ..
            }) => Some(*t),
            _ => terminal.then(Instant::now),
        };
        o.seen = Some(Seen {
            state,
            reason,
            terminal_at,
        });
    }

    /// The newest pending order `(index, order id)` whose POST was sent before `t`.
    pub(crate) fn newest_pending_sent_before(&self, t: Instant) -> Option<(u32, String)> {
        lock(&self.orders)
            .iter()
            .rev()
            .filter(|o| o.pending() && o.sent_at.is_some_and(|s| s < t))
            .find_map(|o| o.order_id().map(|id| (o.spec.index, id.to_owned())))
    }

    pub(crate) fn pending(&self) -> usize {
        lock(&self.orders).iter().filter(|o| o.pending()).count()
    }

    /// A copy of every order.
    pub(crate) fn orders(&self) -> Vec<OrderRecord> {
        lock(&self.orders).clone()
    }

    pub(crate) fn set_outage(&self, outage: Outage) {
        *lock(&self.outage) = outage;
    }

    pub(crate) fn outage(&self) -> Outage {
        *lock(&self.outage)
    }

    /// consumer-service is down now.
    pub(crate) fn consumer_down(&self) -> bool {
        matches!(self.outage(), Outage::Down { .. })
    }

    /// Copies of the latency histograms.
    pub(crate) fn latencies(&self) -> (Histogram<u64>, Histogram<u64>) {
        let l = lock(&self.latencies);
        (l.all.clone(), l.during_outage.clone())
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot {
            total: 0,
            placed: 0,
            failed: 0,
            pending: 0,
            validated: 0,
            rejected: 0,
            p99_ms: quantile_ms(&lock(&self.latencies).all, 0.99),
            outage: self.outage(),
        };
        for o in lock(&self.orders).iter() {
            s.total += 1;
            match &o.placement {
                Placement::NotYet => continue,
                Placement::Failed(_) => {
                    s.failed += 1;
                    continue;
                }
                Placement::Accepted { .. } => s.placed += 1,
            }
            match o
                .seen
                .as_ref()
                .filter(|s| s.terminal_at.is_some())
                .map(|s| s.state.as_str())
            {
                Some("VALIDATED") => s.validated += 1,
                Some(_) => s.rejected += 1,
                None => s.pending += 1,
            }
        }
        s
    }
}
