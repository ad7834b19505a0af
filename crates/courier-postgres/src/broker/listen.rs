//! Wake-ups: a publish sends `pg_notify('courier_broker', '<channel> <schema>')` in its
//! transaction (delivered on commit, so the rows are visible when it arrives); one
//! `LISTEN` connection per broker bumps the fetchers of that channel. Notifications sent
//! while the listener reconnects are lost, so every (re)connect wakes every fetcher once
//! (catch-up), and fetchers also poll on a timer.

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// The `LISTEN` channel of the broker.
pub(super) const NOTIFY_CHANNEL: &str = "courier_broker";

/// The payload of a wake-up for `channel` in `schema` (channel names have no spaces).
pub(super) fn payload(channel: &str, schema: &str) -> String {
    format!("{channel} {schema}")
}

/// One `watch` per channel that some fetcher of this process follows.
#[derive(Debug, Default)]
pub(super) struct Wakes {
    channels: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Wakes {
    /// Follow wake-ups of `channel`.
    pub(super) fn subscribe(&self, channel: &str) -> watch::Receiver<u64> {
        let mut map = match self.channels.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry(channel.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Wake the fetchers of `channel` (and forget channels nobody follows any more).
    pub(super) fn bump(&self, channel: &str) {
        let mut map = match self.channels.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(tx) = map.get(channel) {
            if tx.receiver_count() == 0 {
                map.remove(channel);
            } else {
                tx.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
    }

    /// Wake every fetcher (after the listener reconnected).
    pub(super) fn bump_all(&self) {
        let mut map = match self.channels.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.retain(|_, tx| tx.receiver_count() > 0);
        for tx in map.values() {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

/// Start the listener task; it ends when `stop`'s sender is dropped.
pub(super) fn spawn(
    options: PgConnectOptions,
    schema: String,
    wakes: Arc<Wakes>,
    describe: String,
) -> oneshot::Sender<()> {
    let (stop_tx, stop_rx) = oneshot::channel();
    tokio::spawn(listen(options, schema, wakes, stop_rx, describe));
    stop_tx
}

async fn listen(
    options: PgConnectOptions,
    schema: String,
    wakes: Arc<Wakes>,
    mut stop: oneshot::Receiver<()>,
    describe: String,
) {
    let mut name = format!("courier-broker-listen {schema}");
    while name.len() > 63 {
        name.pop();
    }
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options.application_name(&name));
    let mut failures = 0u32;
    loop {
        let connect = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let error = tokio::select! {
            _ = &mut stop => return,
            r = connect => match r {
                Ok(mut listener) => {
                    failures = 0;
                    wakes.bump_all();
                    loop {
                        tokio::select! {
                            _ = &mut stop => return,
                            r = listener.try_recv() => match r {
                                Ok(Some(n)) => {
                                    if let Some((channel, s)) = n.payload().split_once(' ')
                                        && s == schema
                                    {
                                        wakes.bump(channel);
                                    }
                                }
                                // Reconnected (and re-listened): catch up.
                                Ok(None) => wakes.bump_all(),
                                Err(e) => break e,
                            },
                        }
                    }
                }
                Err(e) => e,
            },
        };
        failures += 1;
        let delay = Duration::from_millis(100u64.saturating_mul(1 << failures.min(6)).min(5_000));
        tracing::warn!(database = %describe, error = %error, ?delay,
            "LISTEN {NOTIFY_CHANNEL} failed; consumers poll until it is back");
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
