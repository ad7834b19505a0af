//! Background group members that acknowledge everything and write down what they saw.

use courier_core::{Message, MessageId, Subscription};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// One delivery as a [`Member`] processed it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The name of the member that processed it.
    pub member: String,
    /// The message.
    pub message: Message,
    /// The delivery's redelivery count.
    pub redeliveries: u32,
}

/// What the members of a test processed, in processing order (shared by the members).
#[derive(Debug, Default)]
pub struct Journal {
    entries: Mutex<Vec<Seen>>,
}

impl Journal {
    /// An empty journal, ready to share between members.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Seen>> {
        match self.entries.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Write down one processed delivery.
    pub fn record(&self, seen: Seen) {
        self.lock().push(seen);
    }

    /// Everything processed so far, in order.
    pub fn entries(&self) -> Vec<Seen> {
        self.lock().clone()
    }

    /// How many deliveries `member` processed.
    pub fn count_by(&self, member: &str) -> usize {
        self.lock().iter().filter(|s| s.member == member).count()
    }

    /// How many deliveries `member` processed among messages whose ids are in `ids`.
    pub fn count_by_among(&self, member: &str, ids: &HashSet<MessageId>) -> usize {
        self.lock()
            .iter()
            .filter(|s| s.member == member && ids.contains(&s.message.id))
            .count()
    }

    /// The ids of every processed message.
    pub fn distinct_ids(&self) -> HashSet<MessageId> {
        self.lock().iter().map(|s| s.message.id).collect()
    }

    /// True when every id of `ids` was processed at least once.
    pub fn has_all(&self, ids: &HashSet<MessageId>) -> bool {
        let seen = self.distinct_ids();
        ids.iter().all(|id| seen.contains(id))
    }

    /// The first processing of each message, in order (later duplicates removed).
    pub fn first_times(&self) -> Vec<Seen> {
        let mut ids = HashSet::new();
        self.lock()
            .iter()
            .filter(|s| ids.insert(s.message.id))
            .cloned()
            .collect()
    }
}

/// A group member running in the background: it acknowledges every delivery right after
/// writing it down in its [`Journal`]. Dropping it (or [`leave`](Self::leave)) drops its
/// subscription, which leaves the group cleanly.
#[derive(Debug)]
pub struct Member {
    name: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Member {
    /// Start processing `subscription` as `name`.
    pub fn spawn(
        name: impl Into<String>,
        mut subscription: Subscription,
        journal: Arc<Journal>,
    ) -> Self {
        let name = name.into();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let me = name.clone();
        let task = tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    biased;
                    _ = &mut stopped => break,
                    d = subscription.next() => match d {
                        Some(d) => d,
                        None => break,
                    },
                };
                let message = match &delivery.message {
                    Ok(m) => m.clone(),
                    Err(bad) => panic!("member {me}: unexpected malformed delivery {bad:?}"),
                };
                journal.record(Seen {
                    member: me.clone(),
                    message: message.clone(),
                    redeliveries: delivery.redeliveries,
                });
                if let Err(e) = delivery.ack().await {
                    panic!("member {me}: ack of message {} failed: {e}", message.id);
                }
            }
            drop(subscription);
        });
        Self {
            name,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The member's name (as written in the journal).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stop processing and leave the group: resolves once the subscription is dropped.
    /// Deliveries still buffered are dropped unacknowledged (the group redelivers them).
    /// Panics if the member's task panicked.
    pub async fn leave(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
            panic!("member {} was cancelled: {e}", self.name);
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
