//! The raw reference for benchmarks: how fast this RabbitMQ confirms persistent
//! publishes made with lapin directly, without Courier, to a stream like the ones a
//! Courier channel uses, so `courier bench` can print it next to Courier's own figure.

use crate::{AmqpTransport, error, topology};
use courier_core::{Error, ErrorKind, Result};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation};
use std::time::{Duration, Instant};

/// Publishes kept in flight, as [`AmqpTransport`] publishes a batch.
const WINDOW: usize = 256;

/// Publish `payload_bytes`-byte persistent messages to a scratch stream on the server at
/// `url` for `duration` (or `max_messages`), 256 messages in flight, each confirmed
/// (publisher confirms), and return confirmed messages per second. The stream is
/// deleted afterwards. A short warm-up runs first and is not counted.
pub async fn raw_publish_rate(
    url: &str,
    payload_bytes: usize,
    duration: Duration,
    max_messages: u64,
) -> Result<f64> {
    let config = AmqpTransport::builder().url(url).build_config();
    let conn = topology::connect(&config, "measuring the raw publish rate").await?;
    let queue = format!("courier:raw-{}", uuid::Uuid::now_v7().simple());
    let ch = topology::open(&conn, "measuring the raw publish rate").await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    ch.queue_declare(
        ShortString::from(queue.as_str()),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .map_err(|e| error::map(format!("declaring the scratch stream {queue}"), e))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| error::map("enabling publisher confirms", e))?;
    let payload = vec![7u8; payload_bytes];
    let properties = BasicProperties::default().with_delivery_mode(2);
    let window = async |n: usize| -> Result<()> {
        let mut pending = Vec::with_capacity(n);
        for _ in 0..n {
            pending.push(
                ch.basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue.as_str()),
                    BasicPublishOptions::default(),
                    &payload,
                    properties.clone(),
                )
                .await
                .map_err(|e| error::map("raw publish", e))?,
            );
        }
        for confirm in pending {
            match confirm.await {
                Ok(Confirmation::Ack(_)) => {}
                Ok(other) => {
                    return Err(Error::new(
                        ErrorKind::Storage,
                        format!("raw publish not confirmed: {other:?}"),
                    ));
                }
                Err(e) => return Err(error::map("raw publish confirm", e)),
            }
        }
        Ok(())
    };
    let run = async {
        window(WINDOW).await?;
        let start = Instant::now();
        let mut n = 0u64;
        while n < max_messages && start.elapsed() < duration {
            window(WINDOW).await?;
            n += WINDOW as u64;
        }
        Ok::<_, Error>(n as f64 / start.elapsed().as_secs_f64().max(1e-9))
    };
    let rate = run.await;
    topology::close(&ch).await;
    if let Err(e) = topology::delete_queues(&conn, std::slice::from_ref(&queue)).await {
        tracing::warn!(queue = %queue, error = %e, "could not delete the scratch stream");
    }
    let _ = conn.close(200, ShortString::from("bye")).await;
    rate
}
