//! Placing the orders on a token schedule: order `k` of a stretch is sent at
//! `start + k × spacing`, whatever the earlier answers took (no drift from waiting for
//! them), with at most [`MAX_IN_FLIGHT`] requests open at once.

use super::api::Api;
use super::live::Live;
use super::plan::Schedule;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Requests open at once before the schedule waits.
pub(crate) const MAX_IN_FLIGHT: usize = 64;

/// What the placer asks of the demo at the outage's edges.
#[derive(Debug)]
pub(crate) enum Phase {
    /// Kill consumer-service now; answer once it is dead.
    Kill(oneshot::Sender<()>),
    /// The outage's time is up: restart consumer-service (the placer goes on meanwhile).
    Restart,
}

/// Places every order of `live` on `schedule` against the order service at `order_url`.
#[derive(Debug)]
pub(crate) struct Placer {
    pub(crate) api: Api,
    pub(crate) order_url: String,
    pub(crate) live: Arc<Live>,
    pub(crate) schedule: Schedule,
}

impl Placer {
    /// Place all orders, asking for the kill and the restart through `phases`; returns
    /// once every request has been answered or has failed.
    pub(crate) async fn run(self, phases: mpsc::Sender<Phase>) {
        let s = self.schedule;
        let this = Arc::new(self);
        let mut stretch = Stretch {
            placer: this,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            tasks: JoinSet::new(),
            next: 0,
        };
        stretch.place(s.before, Instant::now(), s.spacing()).await;
        if !s.outage.is_zero() {
            let (killed_tx, killed) = oneshot::channel();
            if phases.send(Phase::Kill(killed_tx)).await.is_ok() {
                let _ = killed.await;
            }
            let killed_at = Instant::now();
            stretch.place(s.during, killed_at, s.during_spacing()).await;
            tokio::time::sleep_until(killed_at + s.outage).await;
            let _ = phases.send(Phase::Restart).await;
            stretch
                .place(s.after, killed_at + s.outage, s.spacing())
                .await;
        }
        while stretch.tasks.join_next().await.is_some() {}
    }

    async fn place(&self, i: u32) {
        let Some(spec) = self.live.spec(i) else {
            return;
        };
        let during_outage = self.live.consumer_down();
        let key = format!("ftgo-demo-order-{i}");
        let (placement, took) = self
            .api
            .place_order(&self.order_url, &key, &spec.body)
            .await;
        self.live.placed(i, placement, during_outage, took);
    }
}

/// The placer's progress through the orders.
struct Stretch {
    placer: Arc<Placer>,
    permits: Arc<Semaphore>,
    tasks: JoinSet<()>,
    /// The next order's index.
    next: u32,
}

impl Stretch {
    /// Send the next `count` orders at `from`, `from + spacing`, ...
    async fn place(&mut self, count: u32, from: Instant, spacing: Duration) {
        for k in 0..count {
            tokio::time::sleep_until(from + spacing * k).await;
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                return;
            };
            let (placer, i) = (self.placer.clone(), self.next);
            self.next += 1;
            self.tasks.spawn(async move {
                placer.place(i).await;
                drop(permit);
            });
        }
    }
}
