//! The raw reference for benchmarks: how fast this JetStream server confirms publishes
//! made with async-nats directly, without Courier, so `courier bench` can print it next
//! to Courier's own figure.

use crate::{codec, error};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::StorageType};
use courier_core::{Error, ErrorKind, Message, Result};
use std::time::{Duration, Instant};

/// Publishes kept in flight (a sliding window), as [`NatsTransport`](crate::NatsTransport)
/// publishes a batch.
const WINDOW: usize = 256;

/// Publish `payload_bytes`-byte messages to a scratch stream (file storage, one subject)
/// on the server at `url` for `duration` (or `max_messages`), [`WINDOW`] in flight, each
/// confirmed by its JetStream ack, and return confirmed messages per second. The stream
/// is deleted afterwards. A short warm-up runs first and is not counted.
pub async fn raw_publish_rate(
    url: &str,
    payload_bytes: usize,
    duration: Duration,
    max_messages: u64,
) -> Result<f64> {
    let payload = bytes::Bytes::from(vec![7u8; payload_bytes]);
    raw_rate(url, payload, None, duration, max_messages).await
}

/// Like [`raw_publish_rate`], but each publish carries what Courier's message `sample`
/// carries on NATS: its payload, its headers, and a `Nats-Msg-Id` of its own (so the
/// server's duplicate window does its work). This is the reference that compares like
/// with like for a relay: the same bytes and the same server-side work per message,
/// without Courier.
pub async fn raw_publish_rate_with_headers(
    url: &str,
    sample: &Message,
    duration: Duration,
    max_messages: u64,
) -> Result<f64> {
    let headers = codec::encode(sample)?;
    raw_rate(
        url,
        sample.payload.clone(),
        Some(headers),
        duration,
        max_messages,
    )
    .await
}

async fn raw_rate(
    url: &str,
    payload: bytes::Bytes,
    headers: Option<HeaderMap>,
    duration: Duration,
    max_messages: u64,
) -> Result<f64> {
    let shown = error::redact(url);
    let client = async_nats::connect(url).await.map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            format!("measuring the raw publish rate: cannot connect to NATS at {shown}: {e}"),
        )
    })?;
    let js = jetstream::new(client);
    let name = format!("COURIER_RAW_{}", uuid::Uuid::now_v7().simple());
    let subject = format!("courier-raw.{name}");
    js.create_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        storage: StorageType::File,
        max_age: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .map_err(|e| error::map(format!("creating the scratch stream {name} on {shown}"), e))?;
    let subject = async_nats::Subject::from(subject);
    let run = async {
        let publish = async || {
            match &headers {
                None => js.publish(subject.clone(), payload.clone()).await,
                Some(h) => {
                    let mut h = h.clone();
                    h.insert(codec::MSG_ID, uuid::Uuid::now_v7().to_string());
                    js.publish_with_headers(subject.clone(), h, payload.clone())
                        .await
                }
            }
            .map_err(|e| error::map("raw publish", e))
        };
        // A sliding window of WINDOW publishes in flight, the oldest awaited when it is
        // full (as the transport publishes); the first WINDOW confirmations warm up.
        let mut in_flight = std::collections::VecDeque::with_capacity(WINDOW);
        for _ in 0..WINDOW {
            in_flight.push_back(publish().await?);
        }
        let start = Instant::now();
        let mut n = 0u64;
        while n < max_messages && start.elapsed() < duration {
            if let Some(oldest) = in_flight.pop_front() {
                oldest.await.map_err(|e| error::map("raw publish ack", e))?;
                n += 1;
            }
            in_flight.push_back(publish().await?);
        }
        let rate = n as f64 / start.elapsed().as_secs_f64().max(1e-9);
        for ack in in_flight {
            ack.await.map_err(|e| error::map("raw publish ack", e))?;
        }
        Ok::<_, Error>(rate)
    };
    let rate = run.await;
    if let Err(e) = js.delete_stream(&name).await {
        tracing::warn!(stream = %name, error = %e, "could not delete the scratch stream");
    }
    rate
}
