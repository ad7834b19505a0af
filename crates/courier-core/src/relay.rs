//! The relay (polling publisher): moves committed outbox rows to a transport, in order,
//! at least once. Publish, wait for the broker's confirmation, then delete. One relay is
//! active per outbox (a lease in the service database, with a generation checked on every
//! delete); others stand by and take over when its lease expires.

use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::outbox::{OutboxRow, OutboxSource};
use crate::transport::Publisher;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Relay tuning.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Most rows per batch.
    pub batch_size: u32,
    /// Most payload bytes per batch (at least one row is always taken).
    pub batch_bytes: usize,
    /// How long a lease lasts without renewal; a standby takes over after this.
    pub lease_ttl: Duration,
    /// Poll even without a wake-up signal this often.
    pub poll_interval: Duration,
    /// A name for this relay instance (defaults to a fresh id).
    pub instance: String,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            batch_bytes: 4 * 1024 * 1024,
            lease_ttl: Duration::from_secs(3),
            poll_interval: Duration::from_millis(100),
            instance: format!(
                "relay-{}-{}",
                std::process::id(),
                uuid::Uuid::now_v7().simple()
            ),
        }
    }
}

impl RelayConfig {
    /// Set the lease time-to-live.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }
    /// Set the batch size.
    pub fn batch_size(mut self, n: u32) -> Self {
        self.batch_size = n.max(1);
        self
    }
    /// Set the instance name.
    pub fn instance(mut self, name: impl Into<String>) -> Self {
        self.instance = name.into();
        self
    }
}

/// Counters of a running relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Messages published and deleted.
    pub published: AtomicU64,
    /// Batches published.
    pub batches: AtomicU64,
    /// Rows that could not be read as messages (left in place, logged).
    pub unreadable: AtomicU64,
    /// Times this relay took the lease.
    pub leases_taken: AtomicU64,
    /// Steps that failed (database or broker unreachable, rows not deletable yet) and
    /// were tried again after a backoff; each is logged as a warning.
    pub failed_steps: AtomicU64,
}

/// Publishes an [`OutboxSource`]'s committed rows through a [`Publisher`].
pub struct Relay<S, P> {
    store: S,
    publisher: P,
    config: RelayConfig,
    stats: Arc<RelayStats>,
}

impl<S: OutboxSource, P> fmt::Debug for Relay<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("outbox", &self.store.describe())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: OutboxSource, P: Publisher> Relay<S, P> {
    /// A relay from `store`'s outbox to `publisher`.
    pub fn new(store: S, publisher: P) -> Self {
        Self {
            store,
            publisher,
            config: RelayConfig::default(),
            stats: Arc::default(),
        }
    }

    /// Replace the configuration.
    pub fn with_config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// The counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Run until `shutdown` resolves. Broker and database failures are retried with
    /// backoff; nothing is deleted before the broker confirmed it.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let me = self.config.instance.clone();
        let mut wake = self.store.outbox_changes();
        let ttl_ms = self.config.lease_ttl.as_millis() as u64;
        let renew_every = self.config.lease_ttl / 3;
        let mut generation: Option<i64> = None;
        let mut last_renew = tokio::time::Instant::now() - renew_every;
        let mut failures = 0u32;
        let mut recheck = crate::wakeup::Recheck::default();
        // Whether the source's signal is armed since the last wake-up, and how many times
        // in a row it could not be.
        let (mut armed, mut arm_failures) = (false, 0u32);
        tokio::pin!(shutdown);
        loop {
            // Lease: take or renew.
            if last_renew.elapsed() >= renew_every || generation.is_none() {
                match self.store.relay_lease(&me, ttl_ms).await {
                    Ok(g) => {
                        if g.is_some() && g != generation {
                            self.stats.leases_taken.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(relay = %me, generation = ?g, "relay is active");
                        }
                        generation = g;
                        last_renew = tokio::time::Instant::now();
                    }
                    Err(e) => {
                        tracing::warn!(relay = %me, error = %e, "cannot reach the relay lease");
                        generation = None;
                    }
                }
            }
            let mut more = false;
            if let Some(g) = generation {
                match self.step(&me, g).await {
                    Ok(Step::Published(n)) => {
                        failures = 0;
                        more = n > 0;
                    }
                    Ok(Step::Fenced) => {
                        tracing::warn!(relay = %me, "relay lost its lease; standing by");
                        generation = None;
                    }
                    Err(e) => {
                        failures += 1;
                        self.stats.failed_steps.fetch_add(1, Ordering::Relaxed);
                        let delay = backoff(failures);
                        tracing::warn!(relay = %me, error = %e, ?delay, "relay step failed; retrying");
                        tokio::select! {
                            _ = &mut shutdown => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        continue;
                    }
                }
            }
            if more {
                recheck.found();
                continue;
            }
            let mut wait = if generation.is_some() {
                recheck.next_wait(self.config.poll_interval.min(renew_every))
            } else {
                renew_every
            };
            if generation.is_some() && !armed {
                if self.store.outbox_arm().await {
                    // Look once more: rows committed before arming did not signal.
                    (armed, arm_failures) = (true, 0);
                    continue;
                }
                // Writers in flight will not signal: look again shortly (backing off).
                wait = wait.min(Duration::from_millis(1 << (2 * arm_failures.min(5))));
                arm_failures += 1;
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = wake.changed() => {
                    recheck.woken();
                    // A signal disarms it (writers stop signalling while the relay works).
                    armed = false;
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if generation.is_some() {
            let _ = self.store.relay_release(&me).await;
        }
        Ok(())
    }

    /// Publish batches back to back while there are rows, pipelined: while batch k is
    /// published, the rows of batch k-1 (already confirmed) are deleted and batch k+1 is
    /// read (leaving out the rows of k and k-1). Batches are still published one after
    /// the other, so order holds; a crash or a lost lease in between leaves published
    /// rows in place, to be published again (duplicates with the same id, never a gap).
    /// Returns after at most [`DRAIN_BATCHES`] batches so the lease is renewed in time.
    async fn step(&self, me: &str, generation: i64) -> Result<Step> {
        let (limit, bytes) = (self.config.batch_size, self.config.batch_bytes);
        let mut batch = self.readable(self.store.outbox_peek(limit, bytes).await?)?;
        let mut confirmed: Vec<i64> = Vec::new();
        let mut total = 0usize;
        for round in 0..DRAIN_BATCHES {
            if batch.0.is_empty() {
                break;
            }
            let (messages, seqs) = batch;
            let mut exclude = seqs.clone();
            exclude.extend_from_slice(&confirmed);
            let last_round = round + 1 == DRAIN_BATCHES;
            let (published, deleted, next) = tokio::join!(
                self.publisher.publish(&messages),
                self.delete(&confirmed, me, generation),
                async {
                    if last_round {
                        Ok(Vec::new())
                    } else {
                        self.store
                            .outbox_peek_excluding(limit, bytes, &exclude)
                            .await
                    }
                },
            );
            if !deleted? {
                return Ok(Step::Fenced);
            }
            total += confirmed.len();
            published?;
            confirmed = seqs;
            // The batch just confirmed is deleted before any error about the next one
            // is returned, so a bad next row does not make it publish again and again.
            match next.and_then(|rows| self.readable(rows)) {
                Ok(b) => batch = b,
                Err(e) => {
                    if self.delete(&confirmed, me, generation).await? {
                        return Err(e);
                    }
                    return Ok(Step::Fenced);
                }
            }
        }
        if !self.delete(&confirmed, me, generation).await? {
            return Ok(Step::Fenced);
        }
        total += confirmed.len();
        Ok(Step::Published(total))
    }

    /// Delete confirmed rows (fenced); counts them as published. `true` also when there
    /// is nothing to delete.
    async fn delete(&self, seqs: &[i64], me: &str, generation: i64) -> Result<bool> {
        if seqs.is_empty() {
            return Ok(true);
        }
        if !self.store.outbox_delete(seqs, me, generation).await? {
            return Ok(false);
        }
        self.stats
            .published
            .fetch_add(seqs.len() as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// The messages of `rows` up to the first row that cannot be read, with their seqs.
    /// A row another program wrote badly would fail every time and block the outbox: when
    /// it comes first, that is an error, loudly; it is never dropped silently.
    fn readable(&self, rows: Vec<OutboxRow>) -> Result<(Vec<Message>, Vec<i64>)> {
        let mut messages: Vec<Message> = Vec::with_capacity(rows.len());
        let mut seqs = Vec::with_capacity(rows.len());
        for row in rows {
            match row.message {
                Ok(m) => {
                    messages.push(m);
                    seqs.push(row.seq);
                }
                Err(reason) => {
                    self.stats.unreadable.fetch_add(1, Ordering::Relaxed);
                    if messages.is_empty() {
                        return Err(Error::new(
                            ErrorKind::InvalidInput,
                            format!(
                                "outbox row {} in {} cannot be published: {reason}; fix or delete the row",
                                row.seq,
                                self.store.describe()
                            ),
                        ));
                    }
                    break;
                }
            }
        }
        Ok((messages, seqs))
    }
}

/// Most batches one [`Relay::step`] publishes before the lease is checked again.
const DRAIN_BATCHES: usize = 8;

enum Step {
    Published(usize),
    Fenced,
}

fn backoff(failures: u32) -> Duration {
    let ms = 50u64.saturating_mul(1 << failures.min(7)).min(5_000);
    Duration::from_millis(ms / 2 + fastrand::u64(0..=ms / 2))
}
