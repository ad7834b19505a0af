//! Publishing with publisher confirms over one lazily (re)connected connection.

use crate::error::{self};
use crate::{Inner, codec, names, topology};
use courier_core::partition::partition_for;
use courier_core::{Durability, Error, ErrorKind, Message, Receipt, Result};
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{Channel, Connection};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages sent before waiting for their confirms (bounds the unconfirmed window).
const PUBLISH_WINDOW: usize = 256;

/// The publisher's connection and confirm-mode channel, reconnected with backoff.
#[derive(Default)]
pub(crate) struct PublishState {
    link: Option<(Arc<Connection>, Channel)>,
    failures: u32,
    next_attempt: Option<Instant>,
}

impl PublishState {
    /// The live link, connecting first if needed (no faster than the backoff allows).
    pub(crate) async fn link(&mut self, inner: &Inner) -> Result<(Arc<Connection>, Channel)> {
        if let Some((conn, ch)) = &self.link {
            if conn.status().connected() && ch.status().connected() {
                return Ok((conn.clone(), ch.clone()));
            }
            self.link = None;
        }
        if let Some(at) = self.next_attempt
            && Instant::now() < at
        {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "not connected to RabbitMQ at {}; reconnecting (next attempt in {:?})",
                    inner.url,
                    at.saturating_duration_since(Instant::now())
                ),
            ));
        }
        match self.connect(inner).await {
            Ok(link) => {
                self.failures = 0;
                self.next_attempt = None;
                self.link = Some(link.clone());
                Ok(link)
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.next_attempt = Some(
                    Instant::now() + backoff(self.failures, inner.config.max_reconnect_backoff),
                );
                Err(e)
            }
        }
    }

    async fn connect(&self, inner: &Inner) -> Result<(Arc<Connection>, Channel)> {
        let conn = topology::connect(&inner.config, "publisher").await?;
        let ch = topology::open(&conn, "publishing").await?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| error::map("enabling publisher confirms", e))?;
        Ok((Arc::new(conn), ch))
    }

    /// Forget the link after a failure so the next call reconnects.
    pub(crate) fn broken(&mut self) {
        self.link = None;
    }
}

/// The pause before reconnection attempt `failures` (1-based): 100 ms doubling, capped.
pub(crate) fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    Duration::from_millis(100u64.saturating_mul(1u64 << exp)).min(max)
}

/// Publish `messages` and wait for every confirm.
pub(crate) async fn publish(inner: &Inner, messages: &[Message]) -> Result<Receipt> {
    let mut routed = Vec::with_capacity(messages.len());
    for m in messages {
        m.check_size(inner.max_message_bytes)?;
        let channel = m.channel()?;
        routed.push((channel, codec::encode(m)?, m));
    }
    let mut state = inner.publisher.lock().await;
    let (conn, ch) = state.link(inner).await?;
    let outcome = async {
        for window in routed.chunks(PUBLISH_WINDOW) {
            let mut pending = Vec::with_capacity(window.len());
            for (channel, props, m) in window {
                let n = inner.partitions(&conn, channel).await?;
                let key = match m.headers.partition_key() {
                    Some(k) => k.to_owned(),
                    None => m.id.to_string(),
                };
                let stream = names::stream(channel, partition_for(&key, n));
                let confirm = ch
                    .basic_publish(
                        ShortString::from(""),
                        ShortString::from(stream.as_str()),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &m.payload,
                        props.clone(),
                    )
                    .await
                    .map_err(|e| {
                        error::map(
                            format!("publishing message {} to channel {channel}", m.id),
                            e,
                        )
                    })?;
                pending.push((channel, m.id, stream, confirm));
            }
            for (channel, id, stream, confirm) in pending {
                let what = || format!("message {id} to channel {channel} (stream {stream})");
                match confirm.await {
                    Ok(Confirmation::Ack(None)) => {}
                    Ok(Confirmation::Ack(Some(returned))) => {
                        inner.forget(channel);
                        return Err(Error::new(
                            ErrorKind::Storage,
                            format!(
                                "{} was returned as unroutable ({}): the stream is missing \
                                 (channel deleted?); it will be declared again on the next try",
                                what(),
                                returned.reply_text
                            ),
                        ));
                    }
                    Ok(Confirmation::Nack(_)) => {
                        return Err(Error::new(
                            ErrorKind::Storage,
                            format!("RabbitMQ refused (nacked) {}", what()),
                        ));
                    }
                    Ok(Confirmation::NotRequested) => {
                        return Err(Error::new(
                            ErrorKind::Storage,
                            format!("{}: the channel is not in confirm mode", what()),
                        ));
                    }
                    Err(e) => {
                        return Err(error::map(
                            format!("waiting for RabbitMQ to confirm {}", what()),
                            e,
                        ));
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = &outcome
        && (e.kind() == ErrorKind::Unavailable || !ch.status().connected())
    {
        state.broken();
    }
    outcome?;
    Ok(Receipt {
        durability: Durability::Written,
        positions: vec![None; messages.len()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let max = Duration::from_secs(5);
        assert_eq!(backoff(1, max), Duration::from_millis(100));
        assert_eq!(backoff(2, max), Duration::from_millis(200));
        assert_eq!(backoff(10, max), max);
        assert_eq!(backoff(u32::MAX, max), max);
    }
}
