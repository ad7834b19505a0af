//! The dispatcher: runs typed handlers on a subscription's deliveries, each inside a
//! service-database transaction that also records the inbox row (idempotent consumer)
//! and the handler's outgoing messages (outbox): consume → change → produce is atomic.
//!
//! Failures: a transient handler error is retried with backoff ([`RetryPolicy`]); later
//! messages with the same key wait behind it (other keys keep flowing); when retries are
//! used up, or the error is permanent, the message becomes a dead letter and its key stays
//! blocked (later messages with that key are parked as dead letters too) until an operator
//! retries or discards it. See `docs/adr/0002-failing-messages-and-key-order.md`.

use crate::codec::Codec;
use crate::codec::Contract;
use crate::correlation::{ReplyApplied, ReplyRecord};
use crate::dead_letter::{DeadLetter, DeadLetterReason, DeadLetterStatus, NewDeadLetter};
use crate::describe::{
    self, Action, MessageDescription, OperationDescription, ServiceDescription, Style,
};
use crate::error::{Error, ErrorKind, Result};
use crate::handler::{
    CommandHandler, ErasedHandler, HandlerContext, HandlerError, Outgoing, TypedHandler,
};
use crate::headers::Headers;
use crate::interaction::{
    Command, CommandReply, DomainEvent, ErasedReplyHandler, Gathered, Notification, ReplyHandlerFn,
    Requester,
};
use crate::message::{DEFAULT_MAX_MESSAGE_BYTES, Message, MessageId, now_ms};
use crate::names::ChannelName;
use crate::names::GroupName;
use crate::retry::RetryPolicy;
use crate::store::MessageStore;
use crate::transport::BoxFuture;
use crate::transport::{Delivery, Subscription};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How the dispatcher batches, retries and bounds its memory.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DispatcherConfig {
    /// Retries of transient handler failures.
    pub retry: RetryPolicy,
    /// Most messages handled in one service transaction (each in its own savepoint).
    pub max_batch: usize,
    /// Larger messages are dead-lettered as oversized.
    pub max_message_bytes: usize,
    /// How often operator actions on dead letters (retry / discard) are picked up.
    pub redrive_interval: Duration,
    /// Most messages held back behind retrying keys before the dispatcher stops reading.
    pub max_held: usize,
    /// How long inbox rows are kept. Keep it longer than any redelivery can come late
    /// (broker redelivery, relay re-publish, an operator replaying a channel).
    pub inbox_retention: Duration,
    /// How often old inbox rows are pruned.
    pub maintenance_interval: Duration,
    /// How often the deadlines of commands this service sent are checked (timeouts).
    pub deadline_poll_interval: Duration,
    /// How long completed correlation rows are kept (a reply arriving later is logged
    /// as unknown and dead-lettered instead of ignored as late).
    pub correlation_retention: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            max_batch: 64,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            redrive_interval: Duration::from_millis(500),
            max_held: 10_000,
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            maintenance_interval: Duration::from_secs(60),
            deadline_poll_interval: Duration::from_millis(200),
            correlation_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl DispatcherConfig {
    /// Set the retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
    /// Set the batch bound.
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }
    /// Set the size limit.
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }
    /// Set how long inbox rows are kept.
    pub fn inbox_retention(mut self, d: Duration) -> Self {
        self.inbox_retention = d;
        self
    }
    /// Set how often the inbox is pruned.
    pub fn maintenance_interval(mut self, d: Duration) -> Self {
        self.maintenance_interval = d.max(Duration::from_millis(10));
        self
    }
    /// Set how often command deadlines are checked.
    pub fn deadline_poll_interval(mut self, d: Duration) -> Self {
        self.deadline_poll_interval = d.max(Duration::from_millis(5));
        self
    }
    /// Set how long completed correlations are kept.
    pub fn correlation_retention(mut self, d: Duration) -> Self {
        self.correlation_retention = d;
        self
    }
    /// Set the redrive poll interval.
    pub fn redrive_interval(mut self, d: Duration) -> Self {
        self.redrive_interval = d;
        self
    }
}

/// Counters of what a dispatcher did (shared; read them while it runs).
#[derive(Debug, Default)]
pub struct DispatcherStats {
    /// Handlers that succeeded and committed.
    pub handled: AtomicU64,
    /// Deliveries skipped because the inbox had them.
    pub duplicates: AtomicU64,
    /// Transient failures scheduled for retry.
    pub retries: AtomicU64,
    /// Messages stored as dead letters (parked ones included).
    pub dead_lettered: AtomicU64,
    /// Dead letters handled after an operator's retry.
    pub redriven: AtomicU64,
    /// Inbox rows pruned after the retention window.
    pub inbox_pruned: AtomicU64,
    /// Replies matched to a command this service sent.
    pub replies: AtomicU64,
    /// Commands this service sent that timed out.
    pub timeouts: AtomicU64,
    /// Batches the service database failed to take (each retried with backoff).
    pub store_failures: AtomicU64,
}

/// Runs handlers for one subscriber (consumer group) over a service database.
pub struct Dispatcher<S: MessageStore> {
    store: S,
    subscriber: GroupName,
    handlers: HashMap<String, Arc<dyn ErasedHandler<S>>>,
    reply_handlers: HashMap<String, Arc<dyn ErasedReplyHandler<S>>>,
    router: Option<Arc<ReplyRouter<S>>>,
    reply_to: Option<ChannelName>,
    upcasts: HashMap<(String, u32), Upcast>,
    operations: Vec<OperationDescription>,
    wake: Arc<watch::Sender<u64>>,
    config: DispatcherConfig,
    stats: Arc<DispatcherStats>,
}

/// Turns a message of an older version into the current one.
type Upcast = Arc<dyn Fn(&Message) -> Result<Message> + Send + Sync>;

impl<S: MessageStore> fmt::Debug for Dispatcher<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("subscriber", &self.subscriber)
            .field("handles", &self.handlers.keys().collect::<Vec<_>>())
            .field(
                "replies_of",
                &self.reply_handlers.keys().collect::<Vec<_>>(),
            )
            .field("reply_to", &self.reply_to)
            .field("config", &self.config)
            .finish()
    }
}

struct Pending {
    delivery: Delivery,
    failures: u32,
    first_failed_ms: u64,
}

impl Pending {
    fn hold_key(&self) -> String {
        match &self.delivery.message {
            Ok(m) => match m.headers.partition_key() {
                Some(k) => format!("k:{k}"),
                None => format!("id:{}", m.id),
            },
            Err(m) => format!("raw:{}", m.raw_id),
        }
    }
}

enum Disposition {
    Ack,
    Failed(String),
    Held,
}

enum Applied {
    Done,
    Failed(String),
}

/// A batch the service database could not take; retried at `at`.
struct Stalled {
    batch: Vec<Pending>,
    at: Instant,
    outages: u32,
}

#[derive(Default)]
struct State {
    stalled: Option<Stalled>,
    held: HashMap<String, VecDeque<Pending>>,
    held_count: usize,
    timers: BinaryHeap<Reverse<(Instant, u64, String)>>,
    timer_seq: u64,
    blocking: bool,
}

impl<S: MessageStore> Dispatcher<S> {
    /// A dispatcher for `subscriber` (its consumer group name, also its inbox name).
    pub fn new(store: S, subscriber: GroupName) -> Self {
        Self {
            store,
            subscriber,
            handlers: HashMap::new(),
            reply_handlers: HashMap::new(),
            router: None,
            reply_to: None,
            upcasts: HashMap::new(),
            operations: Vec::new(),
            wake: Arc::new(watch::channel(0).0),
            config: DispatcherConfig::default(),
            stats: Arc::default(),
        }
    }

    /// Register the handler of message type `T`: an async function of the context and
    /// the decoded message. Run SQL on `&mut *ctx.tx().await` to join the handler's
    /// transaction; see the README's tour for a complete example.
    pub fn on<T, F, Fut>(mut self, handler: F) -> Self
    where
        T: Contract,
        F: Fn(HandlerContext<S>, T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.handlers.insert(
            T::TYPE.to_owned(),
            Arc::new(TypedHandler::<T, F> {
                f: handler,
                _t: std::marker::PhantomData,
            }),
        );
        self.operations.push(OperationDescription {
            action: Action::Receive,
            channel: None,
            style: Style::Message,
            message: MessageDescription::of::<T>(),
            replies: Vec::new(),
            group: Some(self.subscriber.to_string()),
        });
        self
    }

    /// Register the handler of command `C`. It returns `Ok(Ok(reply))` or
    /// `Ok(Err(failure))` (a typed business refusal); either is sent to the command's
    /// `reply-to` through the handler's transaction, so the reply exists if and only if
    /// the handler's changes committed. `Err(HandlerError)` is retried or dead-lettered
    /// like any handler failure. A command whose deadline has passed is not executed
    /// (dead-lettered as expired; its sender sees a timeout).
    ///
    /// ```text
    /// dispatcher.on_command(|ctx, cmd: ValidateConsumer| async move {
    ///     let known = consumer_exists(&mut *ctx.tx().await, &cmd.consumer_id).await?;
    ///     Ok(if known { Ok(ConsumerValidated { .. }) } else { Err(Rejection::new("unknown consumer")) })
    /// })
    /// ```
    pub fn on_command<C, F, Fut>(mut self, handler: F) -> Self
    where
        C: Command,
        F: Fn(HandlerContext<S>, C) -> Fut + Send + Sync + 'static,
        Fut: Future<
                Output = std::result::Result<
                    std::result::Result<C::Reply, C::Failure>,
                    HandlerError,
                >,
            > + Send
            + 'static,
    {
        self.handlers.insert(
            C::TYPE.to_owned(),
            Arc::new(CommandHandler::<C, F> {
                f: handler,
                responder: self.subscriber.to_string(),
                _c: std::marker::PhantomData,
            }),
        );
        self.operations.push(describe::command_op::<C>(
            Action::Receive,
            Some(self.subscriber.to_string()),
        ));
        self
    }

    /// Register the handler of notification `N` (a one-way command).
    pub fn on_notification<N, F, Fut>(mut self, handler: F) -> Self
    where
        N: Notification,
        F: Fn(HandlerContext<S>, N) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self = self.on::<N, F, Fut>(handler);
        self.operations.pop();
        self.operations.push(OperationDescription {
            action: Action::Receive,
            channel: Some(N::CHANNEL.to_owned()),
            style: Style::Notification,
            message: MessageDescription::of::<N>(),
            replies: Vec::new(),
            group: Some(self.subscriber.to_string()),
        });
        self
    }

    /// Register the handler of domain event `E` (subscribe to the channel
    /// `E::AGGREGATE`; this dispatcher's group gets its own copy of every event).
    pub fn on_event<E, F, Fut>(mut self, handler: F) -> Self
    where
        E: DomainEvent,
        F: Fn(HandlerContext<S>, E) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self = self.on::<E, F, Fut>(handler);
        self.operations.pop();
        self.operations.push(describe::event_op::<E>(
            Action::Receive,
            Some(self.subscriber.to_string()),
        ));
        self
    }

    /// This service's reply channel: commands sent from handlers
    /// ([`HandlerContext::send_command`]) and by [`requester`](Self::requester) ask for
    /// replies there, and this dispatcher (subscribed to it) matches replies to the
    /// correlation rows in the service database.
    pub fn replies_to(mut self, channel: ChannelName) -> Self {
        self.reply_to = Some(channel);
        self
    }

    /// Register the reply handler of command `C`: it runs once per command this service
    /// sent, with the [`Outcome`](crate::Outcome) (replied, failed or timed out) and the
    /// data stored at send time, inside a transaction of the service database. Any
    /// instance of the service may run it, even after a restart.
    pub fn on_reply<C, F, Fut>(mut self, handler: F) -> Self
    where
        C: Command,
        F: Fn(HandlerContext<S>, CommandReply<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.reply_handlers.insert(
            C::TYPE.to_owned(),
            Arc::new(ReplyHandlerFn::<C, CommandReply<C>, F>::new(handler)),
        );
        self.push_reply_ops::<C>();
        self
    }

    /// Register the handler of a scatter-gather of `C`: it runs once, when every expected
    /// responder answered or the deadline passed, with who answered what and who did not.
    pub fn on_gathered<C, F, Fut>(mut self, handler: F) -> Self
    where
        C: Command,
        F: Fn(HandlerContext<S>, Gathered<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.reply_handlers.insert(
            C::TYPE.to_owned(),
            Arc::new(ReplyHandlerFn::<C, Gathered<C>, F>::new(handler)),
        );
        self.push_reply_ops::<C>();
        self
    }

    fn push_reply_ops<C: Command>(&mut self) {
        for message in [
            MessageDescription::of::<C::Reply>(),
            MessageDescription::of::<C::Failure>(),
        ] {
            self.operations.push(OperationDescription {
                action: Action::Receive,
                channel: None,
                style: Style::Reply,
                message: MessageDescription {
                    kind: crate::MessageKind::Reply,
                    ..message
                },
                replies: Vec::new(),
                group: Some(self.subscriber.to_string()),
            });
        }
    }

    /// Read messages of `Old` (an older major version, or an older type name) as `New`
    /// through `From`: the handler of `New` handles both. Chains (v1 → v2 → v3) work when
    /// each step is registered.
    pub fn upcast<Old, New>(mut self) -> Self
    where
        Old: Contract,
        New: Contract + From<Old>,
    {
        let f: Upcast = Arc::new(|msg: &Message| {
            let old = Codec::decode::<Old>(msg)?;
            let new = New::from(old);
            let ct = New::CONTENT_TYPE;
            let payload = new.to_payload(ct)?;
            let mut out = msg.clone();
            out.payload = payload.into();
            out.headers.insert(crate::headers::TYPE, New::TYPE)?;
            out.headers
                .insert(crate::headers::TYPE_VERSION, New::version().to_string())?;
            out.headers.insert(crate::headers::CONTENT_TYPE, ct)?;
            Ok(out)
        });
        self.upcasts.insert((Old::TYPE.to_owned(), Old::VERSION), f);
        self
    }

    /// A [`Requester`] sending commands with this dispatcher's reply channel; this
    /// dispatcher (once running on that channel) wakes it when a reply is recorded.
    pub fn requester(&self) -> Result<Requester<S>> {
        let reply_to = self.reply_to.clone().ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "a requester needs the dispatcher's reply channel: call replies_to first",
            )
        })?;
        Ok(Requester::new(
            self.store.clone(),
            reply_to,
            self.wake.subscribe(),
        ))
    }

    /// What this dispatcher receives (and the replies it sends), for AsyncAPI. Merge it
    /// into the service's [`ServiceDescription`].
    pub fn description(&self, service: &str) -> ServiceDescription {
        let mut d = ServiceDescription::new(service);
        for op in &self.operations {
            let mut op = op.clone();
            if op.style == Style::Reply && op.channel.is_none() {
                op.channel = self.reply_to.as_ref().map(ToString::to_string);
            }
            d.push(op);
        }
        d
    }

    /// Replace the configuration.
    pub fn with_config(mut self, config: DispatcherConfig) -> Self {
        self.config = config;
        self
    }

    /// The counters.
    pub fn stats(&self) -> Arc<DispatcherStats> {
        self.stats.clone()
    }

    /// The message types with a handler.
    pub fn message_types(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }

    /// Handle deliveries until `shutdown` resolves or the subscription ends. Returns an
    /// error only when the service database stays unusable.
    pub async fn run(
        mut self,
        mut subscription: Subscription,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let correlating = self.reply_to.is_some() || !self.reply_handlers.is_empty();
        if correlating {
            self.router = Some(Arc::new(ReplyRouter {
                store: self.store.clone(),
                handlers: self.reply_handlers.clone(),
                subscriber: self.subscriber.to_string(),
                stats: self.stats.clone(),
            }));
        }
        let mut deadlines = tokio::time::interval(self.config.deadline_poll_interval);
        deadlines.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut st = State {
            blocking: self
                .store
                .blocking_dead_letters(self.subscriber.as_str())
                .await?
                > 0,
            ..State::default()
        };
        let mut redrive = tokio::time::interval(self.config.redrive_interval);
        redrive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut maintenance = tokio::time::interval(self.config.maintenance_interval);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            // While the service database fails, retry the stalled batch (nothing was acked)
            // and read nothing new: back-pressure, and order per key is kept.
            if let Some(stalled) = st.stalled.take() {
                let at = stalled.at;
                tokio::select! {
                    biased;
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep_until(at) => {
                        self.process_with(stalled.batch, &mut st, stalled.outages).await?;
                    }
                }
                continue;
            }
            let next_timer = st.timers.peek().map(|Reverse((t, _, _))| *t);
            let can_read = st.held_count < self.config.max_held;
            tokio::select! {
                biased;
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep_until(next_timer.unwrap_or_else(Instant::now)), if next_timer.is_some() => {
                    let batch = self.take_due(&mut st);
                    self.process(batch, &mut st).await?;
                }
                d = subscription.next(), if can_read => {
                    let Some(d) = d else { return Ok(()) };
                    let mut batch = Vec::new();
                    self.route(d, &mut batch, &mut st);
                    while batch.len() < self.config.max_batch {
                        match subscription.try_next() {
                            Some(d) => self.route(d, &mut batch, &mut st),
                            None => break,
                        }
                    }
                    self.process(batch, &mut st).await?;
                }
                _ = maintenance.tick() => {
                    let keep_ms = self.config.inbox_retention.as_millis() as u64;
                    match self.store.prune_inbox(keep_ms, 500).await {
                        Ok(n) => { self.stats.inbox_pruned.fetch_add(n, Ordering::Relaxed); }
                        Err(e) => tracing::warn!(subscriber = %self.subscriber, error = %e, "pruning the inbox failed; will try again"),
                    }
                    if correlating {
                        let keep_ms = self.config.correlation_retention.as_millis() as u64;
                        if let Err(e) = self.store.prune_correlations(keep_ms, 500).await {
                            tracing::warn!(subscriber = %self.subscriber, error = %e, "pruning correlations failed; will try again");
                        }
                    }
                }
                _ = deadlines.tick(), if correlating => {
                    if let Err(e) = self.expire_correlations().await {
                        tracing::warn!(subscriber = %self.subscriber, error = %e, "checking command deadlines failed; will try again");
                    }
                }
                _ = redrive.tick() => {
                    if let Err(e) = self.redrive(&mut st).await {
                        tracing::warn!(subscriber = %self.subscriber, error = %e, "redrive of dead letters failed; will try again");
                    }
                }
            }
        }
    }

    fn route(&self, mut delivery: Delivery, batch: &mut Vec<Pending>, st: &mut State) {
        if !self.upcasts.is_empty()
            && let Ok(msg) = &mut delivery.message
        {
            self.upcast_in_place(msg);
        }
        let p = Pending {
            delivery,
            failures: 0,
            first_failed_ms: 0,
        };
        let key = p.hold_key();
        if let Some(q) = st.held.get_mut(&key) {
            q.push_back(p);
            st.held_count += 1;
        } else {
            batch.push(p);
        }
    }

    fn take_due(&self, st: &mut State) -> Vec<Pending> {
        let now = Instant::now();
        let mut batch = Vec::new();
        while let Some(Reverse((t, _, _))) = st.timers.peek() {
            if *t > now || batch.len() >= self.config.max_batch {
                break;
            }
            let Some(Reverse((_, _, key))) = st.timers.pop() else {
                break;
            };
            if let Some(q) = st.held.get_mut(&key) {
                let n = q.len().min(self.config.max_batch.max(1));
                batch.extend(q.drain(..n));
                st.held_count -= n;
                if q.is_empty() {
                    st.held.remove(&key);
                }
            }
        }
        batch
    }

    /// Handle a batch in one transaction, retrying the whole batch with backoff while the
    /// service database fails (nothing is acked before the commit).
    async fn process(&self, batch: Vec<Pending>, st: &mut State) -> Result<()> {
        self.process_with(batch, st, 0).await
    }

    /// Handle a batch in one transaction. When the service database fails transiently
    /// the batch is parked in `st.stalled` for a retry with backoff (nothing is acked
    /// before a commit); a permanent failure (corrupt file, a handler that keeps its
    /// context) ends [`run`](Self::run) with that error.
    async fn process_with(&self, batch: Vec<Pending>, st: &mut State, outages: u32) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let attempt = if st.blocking {
            self.try_batch(&batch, st, None).await
        } else {
            match self.try_batch_fast(&batch).await {
                Ok(Ok(d)) => Ok(d),
                // A handler failed: redo the batch message by message (savepoints).
                Ok(Err(failed)) => self.try_batch(&batch, st, Some(failed)).await,
                Err(e) => Err(e),
            }
        };
        match attempt {
            Ok(dispositions) => {
                self.settle(batch, dispositions, st).await;
                Ok(())
            }
            Err(e) if !e.is_retryable() => {
                tracing::error!(subscriber = %self.subscriber, error = %e,
                    "the service database failed permanently; stopping the dispatcher");
                Err(e)
            }
            Err(e) => {
                self.stats.store_failures.fetch_add(1, Ordering::Relaxed);
                let outages = outages + 1;
                let delay = self
                    .config
                    .retry
                    .backoff(outages)
                    .max(Duration::from_millis(10));
                tracing::warn!(subscriber = %self.subscriber, error = %e, ?delay,
                    "service database failed during a batch; retrying the batch");
                st.stalled = Some(Stalled {
                    batch,
                    at: Instant::now() + delay,
                    outages,
                });
                Ok(())
            }
        }
    }

    /// The common case, no key blocked: one transaction, one inbox statement for the
    /// batch, no savepoints. If a handler fails, everything is rolled back and the
    /// failure is returned; the caller then runs the batch through
    /// [`try_batch`](Self::try_batch) (a savepoint per message), giving it that failure as
    /// the failed message's outcome so no handler runs more often than the policy allows.
    async fn try_batch_fast(
        &self,
        batch: &[Pending],
    ) -> Result<std::result::Result<Vec<Disposition>, (usize, HandlerError)>> {
        let sub = self.subscriber.as_str();
        let mut tx = self.store.begin().await?;
        let mut dead = 0u64;
        let mut ready: Vec<(usize, Arc<dyn ErasedHandler<S>>)> = Vec::with_capacity(batch.len());
        for (i, p) in batch.iter().enumerate() {
            let msg = match &p.delivery.message {
                Ok(m) => m,
                Err(raw) => {
                    let dl = self.dead_letter_raw(p, raw, DeadLetterReason::Malformed, &raw.reason);
                    self.store.dead_letter_insert(&mut tx, &dl).await?;
                    dead += 1;
                    continue;
                }
            };
            let refusal = match msg.check_size(self.config.max_message_bytes) {
                Err(e) => Err((DeadLetterReason::Oversized, e.to_string())),
                Ok(()) => self.handler_for(msg),
            };
            match refusal {
                Ok(h) => ready.push((i, h)),
                Err((reason, error)) => {
                    let dl = self.dead_letter(p, msg, reason, &error, DeadLetterStatus::Dead);
                    self.store.dead_letter_insert(&mut tx, &dl).await?;
                    dead += 1;
                }
            }
        }
        let ids: Vec<String> = ready
            .iter()
            .filter_map(|(i, _)| {
                batch[*i]
                    .delivery
                    .message
                    .as_ref()
                    .ok()
                    .map(|m| m.id.to_string())
            })
            .collect();
        let mut new = self.store.inbox_record_many(&mut tx, sub, &ids).await?;
        let (mut handled, mut duplicates) = (0u64, 0u64);
        for (i, handler) in ready {
            let p = &batch[i];
            let Ok(msg) = &p.delivery.message else {
                continue;
            };
            // `remove`: a second copy of the same message in this batch is a duplicate.
            if !new.remove(&msg.id.to_string()) {
                duplicates += 1;
                continue;
            }
            let (t, outcome) = self.invoke(handler, tx, msg, p.failures + 1).await?;
            tx = t;
            if let Err(e) = outcome {
                drop(tx);
                return Ok(Err((i, e)));
            }
            handled += 1;
        }
        self.store.commit(tx).await?;
        if self.router.is_some() {
            self.wake.send_modify(|v| *v += 1);
        }
        self.stats.handled.fetch_add(handled, Ordering::Relaxed);
        self.stats
            .duplicates
            .fetch_add(duplicates, Ordering::Relaxed);
        self.stats.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        Ok(Ok(batch.iter().map(|_| Disposition::Ack).collect()))
    }

    async fn try_batch(
        &self,
        batch: &[Pending],
        st: &mut State,
        mut known_failure: Option<(usize, HandlerError)>,
    ) -> Result<Vec<Disposition>> {
        let mut tx = self.store.begin().await?;
        let mut out = Vec::with_capacity(batch.len());
        let mut failed_keys = HashSet::new();
        let mut new_blocking = false;
        for (i, p) in batch.iter().enumerate() {
            let key = p.hold_key();
            if failed_keys.contains(&key) {
                out.push(Disposition::Held);
                continue;
            }
            let (t, applied, blocks) = match known_failure.take_if(|(k, _)| *k == i) {
                Some((_, e)) => self.handler_failed(tx, p, e).await?,
                None => self.apply(tx, p, st.blocking || new_blocking).await?,
            };
            tx = t;
            new_blocking |= blocks;
            match applied {
                Applied::Done => out.push(Disposition::Ack),
                Applied::Failed(e) => {
                    failed_keys.insert(key);
                    out.push(Disposition::Failed(e));
                }
            }
        }
        self.store.commit(tx).await?;
        if self.router.is_some() {
            self.wake.send_modify(|v| *v += 1);
        }
        st.blocking |= new_blocking;
        Ok(out)
    }

    async fn settle(&self, batch: Vec<Pending>, dispositions: Vec<Disposition>, st: &mut State) {
        let mut returned: HashMap<String, Vec<Pending>> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        // A lost connection fails every ack of the batch: one line says it, not one each.
        let mut failed_acks = 0usize;
        let mut first_ack_error = None;
        // Acks go out together (issued in order), not one round trip after the other.
        let mut acks = Vec::new();
        for (mut p, d) in batch.into_iter().zip(dispositions) {
            match d {
                Disposition::Ack => acks.push(p.delivery.ack()),
                Disposition::Failed(error) => {
                    p.failures += 1;
                    if p.first_failed_ms == 0 {
                        p.first_failed_ms = now_ms();
                    }
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    let delay = self
                        .config
                        .retry
                        .next_delay(p.failures)
                        .unwrap_or(self.config.retry.max_delay);
                    let key = p.hold_key();
                    tracing::info!(subscriber = %self.subscriber, key = %key, attempt = p.failures, ?delay, %error,
                        "handler failed transiently; retrying later, same-key messages wait");
                    st.timer_seq += 1;
                    st.timers
                        .push(Reverse((Instant::now() + delay, st.timer_seq, key.clone())));
                    if !returned.contains_key(&key) {
                        order.push(key.clone());
                    }
                    returned.entry(key).or_default().push(p);
                }
                Disposition::Held => {
                    let key = p.hold_key();
                    if !returned.contains_key(&key) {
                        order.push(key.clone());
                    }
                    returned.entry(key).or_default().push(p);
                }
            }
        }
        for r in futures::future::join_all(acks).await {
            if let Err(e) = r {
                failed_acks += 1;
                first_ack_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_ack_error {
            tracing::warn!(
                error = %e,
                failed = failed_acks,
                "acks failed; the broker will redeliver those messages and the inbox will skip them"
            );
        }
        for key in order {
            if let Some(items) = returned.remove(&key) {
                let q = st.held.entry(key).or_default();
                st.held_count += items.len();
                for p in items.into_iter().rev() {
                    q.push_front(p);
                }
            }
        }
    }

    /// Apply one message inside `tx`. Returns the transaction, what happened, and whether
    /// a key-blocking dead letter was written.
    async fn apply(
        &self,
        mut tx: S::Tx,
        p: &Pending,
        blocking: bool,
    ) -> Result<(S::Tx, Applied, bool)> {
        let sub = self.subscriber.as_str();
        let msg = match &p.delivery.message {
            Ok(m) => m,
            Err(raw) => {
                let dl = self.dead_letter_raw(p, raw, DeadLetterReason::Malformed, &raw.reason);
                self.store.dead_letter_insert(&mut tx, &dl).await?;
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                return Ok((tx, Applied::Done, false));
            }
        };
        if let Err(e) = msg.check_size(self.config.max_message_bytes) {
            let dl = self.dead_letter(
                p,
                msg,
                DeadLetterReason::Oversized,
                &e.to_string(),
                DeadLetterStatus::Dead,
            );
            self.store.dead_letter_insert(&mut tx, &dl).await?;
            self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            return Ok((tx, Applied::Done, false));
        }
        if blocking
            && let Some(key) = msg.headers.partition_key()
            && self.store.key_blocked(&mut tx, sub, key).await?
        {
            let dl = self.dead_letter(
                p,
                msg,
                DeadLetterReason::Parked,
                &format!(
                    "held back: an earlier message with key {key:?} is a dead letter of {sub}"
                ),
                DeadLetterStatus::Parked,
            );
            self.store.dead_letter_insert(&mut tx, &dl).await?;
            self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            return Ok((tx, Applied::Done, true));
        }
        self.store.savepoint(&mut tx).await?;
        if !self
            .store
            .inbox_record(&mut tx, sub, &msg.id.to_string())
            .await?
        {
            self.store.release_savepoint(&mut tx).await?;
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok((tx, Applied::Done, false));
        }
        let (mut tx, outcome) = self.run_handler(tx, msg, p.failures + 1).await?;
        match outcome {
            Ok(()) => {
                self.store.release_savepoint(&mut tx).await?;
                self.stats.handled.fetch_add(1, Ordering::Relaxed);
                Ok((tx, Applied::Done, false))
            }
            Err(Refusal::NotHandled(reason, error)) => {
                self.store.rollback_savepoint(&mut tx).await?;
                let dl = self.dead_letter(p, msg, reason, &error, DeadLetterStatus::Dead);
                self.store.dead_letter_insert(&mut tx, &dl).await?;
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                Ok((tx, Applied::Done, reason.blocks_key()))
            }
            Err(Refusal::Failed(e)) => {
                self.store.rollback_savepoint(&mut tx).await?;
                self.handler_failed(tx, p, e).await
            }
        }
    }

    /// A handler failed on `p` (its writes are already undone): schedule a retry, or store
    /// a dead letter when the error is permanent or the attempts are used up.
    async fn handler_failed(
        &self,
        mut tx: S::Tx,
        p: &Pending,
        e: HandlerError,
    ) -> Result<(S::Tx, Applied, bool)> {
        let sub = self.subscriber.as_str();
        let Ok(msg) = &p.delivery.message else {
            return Ok((tx, Applied::Failed(e.to_string()), false));
        };
        let attempts = p.failures + 1;
        let exhausted = self.config.retry.next_delay(attempts).is_none();
        if e.is_transient() && !exhausted {
            return Ok((tx, Applied::Failed(e.to_string()), false));
        }
        let reason = if e.is_undecodable() {
            DeadLetterReason::Undecodable
        } else if e.is_transient() {
            DeadLetterReason::Exhausted
        } else {
            DeadLetterReason::Permanent
        };
        tracing::warn!(subscriber = sub, message = %msg.id, %reason, error = %e, "message dead-lettered");
        let dl = self.dead_letter(p, msg, reason, &e.to_string(), DeadLetterStatus::Dead);
        self.store.dead_letter_insert(&mut tx, &dl).await?;
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        Ok((tx, Applied::Done, reason.blocks_key()))
    }

    /// The handler for `msg`, or why it cannot be handled (expired, no type, no handler).
    fn handler_for(
        &self,
        msg: &Message,
    ) -> std::result::Result<Arc<dyn ErasedHandler<S>>, (DeadLetterReason, String)> {
        if let Some(deadline) = msg.headers.deadline_ms().ok().flatten()
            && deadline < now_ms()
        {
            return Err((
                DeadLetterReason::Expired,
                format!("deadline {deadline} (ms since epoch) passed before delivery"),
            ));
        }
        if let Some(router) = &self.router
            && matches!(
                msg.headers.message_kind(),
                Ok(Some(crate::MessageKind::Reply))
            )
            && msg.headers.correlation_id().is_some()
        {
            return Ok(router.clone());
        }
        match msg.headers.message_type() {
            Ok(Some(ty)) => self.handlers.get(ty.as_str()).cloned().ok_or_else(|| {
                (
                    DeadLetterReason::UnknownType,
                    format!("{} has no handler for message type {ty:?}", self.subscriber),
                )
            }),
            Ok(None) => Err((
                DeadLetterReason::UnknownType,
                "message has no 'type' header".to_owned(),
            )),
            Err(e) => Err((DeadLetterReason::Malformed, e.to_string())),
        }
    }

    /// Find the handler and run it with the transaction; on success the handler's
    /// outgoing messages are written to the outbox in the same transaction.
    async fn run_handler(
        &self,
        tx: S::Tx,
        msg: &Message,
        attempt: u32,
    ) -> Result<(S::Tx, std::result::Result<(), Refusal>)> {
        match self.handler_for(msg) {
            Ok(handler) => {
                let (tx, r) = self.invoke(handler, tx, msg, attempt).await?;
                Ok((tx, r.map_err(Refusal::Failed)))
            }
            Err((reason, error)) => Ok((tx, Err(Refusal::NotHandled(reason, error)))),
        }
    }

    /// Run `handler` with the transaction (panics become transient errors); on success
    /// its outgoing messages go to the outbox in the same transaction.
    async fn invoke(
        &self,
        handler: Arc<dyn ErasedHandler<S>>,
        tx: S::Tx,
        msg: &Message,
        attempt: u32,
    ) -> Result<(S::Tx, std::result::Result<(), HandlerError>)> {
        let envelope = Arc::new(msg.clone());
        self.invoke_with(tx, envelope, attempt, |ctx| handler.call(ctx, msg))
            .await
    }

    /// Run `call` with a context over `tx` (panics become transient errors); on success
    /// what it sent goes to the outbox in the same transaction.
    async fn invoke_with(
        &self,
        tx: S::Tx,
        envelope: Arc<Message>,
        attempt: u32,
        call: impl FnOnce(
            HandlerContext<S>,
        ) -> BoxFuture<'static, std::result::Result<(), HandlerError>>,
    ) -> Result<(S::Tx, std::result::Result<(), HandlerError>)> {
        let id = envelope.id;
        let (ctx, tx_cell, outgoing) =
            HandlerContext::<S>::new(tx, envelope, attempt, self.reply_to.clone());
        let fut = call(ctx);
        let result = match futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(fut)).await
        {
            Ok(r) => r,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                Err(HandlerError::transient(format!("handler panicked: {what}")))
            }
        };
        let mut tx = match Arc::try_unwrap(tx_cell) {
            Ok(m) => m.into_inner(),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "the handler of message {} kept its HandlerContext after returning; \
                         do not move the context into spawned tasks",
                        id
                    ),
                ));
            }
        };
        if result.is_ok() {
            self.write_outgoing(&mut tx, &outgoing).await?;
        }
        Ok((tx, result))
    }

    /// Write what a successful handler sent (messages, correlation rows) into `tx`.
    async fn write_outgoing(
        &self,
        tx: &mut S::Tx,
        outgoing: &std::sync::Mutex<Outgoing>,
    ) -> Result<()> {
        let out = std::mem::take(
            &mut *outgoing
                .lock()
                .map_err(|_| Error::new(ErrorKind::Closed, "handler context poisoned"))?,
        );
        if !out.correlations.is_empty() {
            self.store.correlation_insert(tx, &out.correlations).await?;
        }
        if !out.messages.is_empty() {
            self.store.outbox_insert(tx, &out.messages).await?;
        }
        Ok(())
    }

    /// Apply registered upcasts (older version → current) to `msg`, in a chain.
    fn upcast_in_place(&self, msg: &mut Message) {
        for _ in 0..16 {
            let Some(ty) = msg.headers.get(crate::headers::TYPE) else {
                return;
            };
            let major = match msg.headers.type_version() {
                Ok(Some(v)) => v.major,
                Ok(None) => 1,
                Err(_) => return,
            };
            let Some(f) = self.upcasts.get(&(ty.to_owned(), major)) else {
                return;
            };
            match f(msg) {
                Ok(newer) => *msg = newer,
                Err(e) => {
                    tracing::warn!(subscriber = %self.subscriber, message = %msg.id, error = %e,
                        "upcast to the current version failed; the message will be dead-lettered");
                    return;
                }
            }
        }
    }

    /// Time out the commands this service sent whose deadline passed: run their reply
    /// handlers with `TimedOut` (or the gather handler with what arrived), each in a
    /// savepoint of one transaction; a failing handler is retried with backoff.
    async fn expire_correlations(&self) -> Result<()> {
        let mut tx = self.store.begin().await?;
        let expired = self.store.correlation_expire(&mut tx, now_ms(), 32).await?;
        if expired.is_empty() {
            return Ok(());
        }
        let n = expired.len() as u64;
        for rec in expired {
            let id = rec.correlation.correlation_id.clone();
            let Some(handler) = self
                .reply_handlers
                .get(&rec.correlation.command_type)
                .cloned()
            else {
                continue; // request().await only: the waiting requester reads the row
            };
            let mut envelope = Message::new(bytes::Bytes::new());
            envelope
                .headers
                .insert(crate::headers::CORRELATION_ID, id.clone())?;
            let attempt = rec.attempts + 1;
            self.store.savepoint(&mut tx).await?;
            let (t, result) = self
                .invoke_with(tx, Arc::new(envelope), attempt, |ctx| {
                    handler.call(ctx, rec)
                })
                .await?;
            tx = t;
            match result {
                Ok(()) => self.store.release_savepoint(&mut tx).await?,
                Err(e) => {
                    self.store.rollback_savepoint(&mut tx).await?;
                    let delay = if e.is_transient() {
                        self.config.retry.next_delay(attempt)
                    } else {
                        None
                    };
                    let give_up = delay.is_none();
                    let retry_at = now_ms() + delay.unwrap_or_default().as_millis() as u64;
                    tracing::warn!(subscriber = %self.subscriber, correlation = %id, attempt, error = %e, give_up,
                        "timeout handler failed");
                    self.store
                        .correlation_retry_later(&mut tx, &id, &e.to_string(), retry_at, give_up)
                        .await?;
                }
            }
        }
        self.store.commit(tx).await?;
        self.stats.timeouts.fetch_add(n, Ordering::Relaxed);
        self.wake.send_modify(|v| *v += 1);
        Ok(())
    }

    fn dead_letter(
        &self,
        p: &Pending,
        msg: &Message,
        reason: DeadLetterReason,
        error: &str,
        status: DeadLetterStatus,
    ) -> NewDeadLetter {
        let now = now_ms();
        NewDeadLetter {
            subscriber: self.subscriber.to_string(),
            channel: p.delivery.channel.to_string(),
            message_id: msg.id.to_string(),
            partition_key: msg.headers.partition_key().map(str::to_owned),
            message_type: msg.headers.get(crate::headers::TYPE).map(str::to_owned),
            headers_json: msg.headers.to_json(),
            payload: msg.payload.clone(),
            reason,
            error: error.to_owned(),
            attempts: p.failures + 1,
            first_failed_at_ms: if p.first_failed_ms == 0 {
                now
            } else {
                p.first_failed_ms
            },
            last_failed_at_ms: now,
            status,
        }
    }

    fn dead_letter_raw(
        &self,
        p: &Pending,
        raw: &crate::transport::Malformed,
        reason: DeadLetterReason,
        error: &str,
    ) -> NewDeadLetter {
        let now = now_ms();
        NewDeadLetter {
            subscriber: self.subscriber.to_string(),
            channel: p.delivery.channel.to_string(),
            message_id: raw.raw_id.clone(),
            partition_key: None,
            message_type: None,
            headers_json: raw.raw_headers.clone(),
            payload: raw.payload.clone(),
            reason,
            error: error.to_owned(),
            attempts: 1,
            first_failed_at_ms: now,
            last_failed_at_ms: now,
            status: DeadLetterStatus::Dead,
        }
    }

    /// Pick up dead letters an operator asked to retry, handle each in its own
    /// transaction, and refresh whether any key is blocked.
    async fn redrive(&self, st: &mut State) -> Result<()> {
        let sub = self.subscriber.as_str();
        loop {
            let batch = self.store.redrive_batch(sub, 100).await?;
            if batch.is_empty() {
                break;
            }
            let mut failed_keys: HashSet<String> = HashSet::new();
            let mut progressed = false;
            for dl in batch {
                if let Some(k) = &dl.record.partition_key
                    && failed_keys.contains(k)
                {
                    continue;
                }
                match self.redrive_one(&dl).await? {
                    None => {
                        progressed = true;
                        self.stats.redriven.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(error) => {
                        tracing::warn!(subscriber = sub, dead_letter = dl.id, %error, "retried dead letter failed again");
                        self.store
                            .dead_letter_failed_again(&dl, &error, now_ms())
                            .await?;
                        if let Some(k) = &dl.record.partition_key {
                            failed_keys.insert(k.clone());
                        }
                    }
                }
            }
            if !progressed {
                break;
            }
        }
        st.blocking = self.store.blocking_dead_letters(sub).await? > 0;
        Ok(())
    }

    /// `None` when handled; `Some(error)` when it failed again.
    async fn redrive_one(&self, dl: &DeadLetter) -> Result<Option<String>> {
        let r = &dl.record;
        let msg = match (
            MessageId::parse(&r.message_id),
            Headers::from_json(&r.headers.to_string()),
        ) {
            (Ok(id), Ok(headers)) => Message {
                id,
                headers,
                payload: r.payload.clone(),
            },
            (Err(e), _) | (_, Err(e)) => return Ok(Some(format!("still malformed: {e}"))),
        };
        let mut tx = self.store.begin().await?;
        self.store.savepoint(&mut tx).await?;
        if !self
            .store
            .inbox_record(&mut tx, self.subscriber.as_str(), &r.message_id)
            .await?
        {
            // Already handled (e.g. a duplicate delivery was parked): just resolve it.
            self.store.release_savepoint(&mut tx).await?;
            self.store.dead_letter_resolved(&mut tx, dl).await?;
            self.store.commit(tx).await?;
            return Ok(None);
        }
        let (mut tx, outcome) = self.run_handler(tx, &msg, r.attempts + 1).await?;
        match outcome {
            Ok(()) => {
                self.store.release_savepoint(&mut tx).await?;
                self.store.dead_letter_resolved(&mut tx, dl).await?;
                self.store.commit(tx).await?;
                Ok(None)
            }
            Err(refusal) => {
                self.store.rollback_savepoint(&mut tx).await?;
                drop(tx);
                Ok(Some(match refusal {
                    Refusal::NotHandled(reason, e) => format!("{reason}: {e}"),
                    Refusal::Failed(e) => e.to_string(),
                }))
            }
        }
    }
}

enum Refusal {
    /// Never reached a handler (no handler, expired, malformed type).
    NotHandled(DeadLetterReason, String),
    /// The handler returned an error (or panicked).
    Failed(HandlerError),
}

/// Matches replies to the correlation rows of the commands this service sent, and runs
/// the reply handler of the command type when a correlation completes.
struct ReplyRouter<S: MessageStore> {
    store: S,
    handlers: HashMap<String, Arc<dyn ErasedReplyHandler<S>>>,
    subscriber: String,
    stats: Arc<DispatcherStats>,
}

impl<S: MessageStore> ErasedHandler<S> for ReplyRouter<S> {
    fn call(
        &self,
        ctx: HandlerContext<S>,
        message: &Message,
    ) -> BoxFuture<'static, std::result::Result<(), HandlerError>> {
        let store = self.store.clone();
        let handlers = self.handlers.clone();
        let subscriber = self.subscriber.clone();
        let stats = self.stats.clone();
        let msg = message.clone();
        Box::pin(async move {
            let correlation = msg.headers.correlation_id().unwrap_or_default().to_owned();
            let responder = msg
                .headers
                .get(crate::headers::RESPONDER)
                .unwrap_or("unknown")
                .to_owned();
            let ty = msg
                .headers
                .get(crate::headers::TYPE)
                .unwrap_or("?")
                .to_owned();
            let record = ReplyRecord::of(&msg, &responder);
            let applied = {
                let mut tx = ctx.tx.lock().await;
                store
                    .correlation_reply(&mut tx, &correlation, &record)
                    .await?
            };
            match applied {
                ReplyApplied::Unknown => Err(HandlerError::permanent(format!(
                    "reply {} ({ty}) from {responder} has correlation id {correlation}, which \
                     matches no command sent by {subscriber} (never sent from this service's \
                     database, or pruned)",
                    msg.id
                ))),
                ReplyApplied::AlreadyComplete(state) => {
                    tracing::info!(%subscriber, reply = %msg.id, %correlation, %state, %responder,
                        "reply to a command that already completed; ignored");
                    Ok(())
                }
                ReplyApplied::Completed(rec) => {
                    stats.replies.fetch_add(1, Ordering::Relaxed);
                    let Some(handler) = handlers.get(&rec.correlation.command_type).cloned() else {
                        return Ok(()); // a requester reads the row
                    };
                    if !rec.correlation.gather
                        && let Err(why) = handler.check(&msg)
                    {
                        return Err(HandlerError::permanent(why));
                    }
                    handler.call(ctx, *rec).await
                }
                _ => {
                    stats.replies.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            }
        })
    }
}
