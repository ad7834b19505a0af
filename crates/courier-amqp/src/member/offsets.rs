//! A group's committed offsets: one durable queue per partition holding its last
//! message (`x-max-length = 1`), the offset as text.

use crate::error;
use crate::{codec, topology};
use courier_core::{Error, ErrorKind, Result};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use std::time::Duration;

/// Declare a group's offset queue for one partition (holds its last message only).
pub(crate) async fn declare_offset_queue(ch: &Channel, name: &str) -> lapin::Result<()> {
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    ch.queue_declare(
        ShortString::from(name),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .map(|_| ())
}

/// Commit `offset` (confirmed) to the offset queue.
pub(crate) async fn commit(ch: &Channel, queue: &str, offset: u64) -> Result<()> {
    let confirm = ch
        .basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            offset.to_string().as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .map_err(|e| error::map(format!("committing offset {offset} to {queue}"), e))?;
    match confirm.await {
        Ok(lapin::Confirmation::Ack(None)) => Ok(()),
        Ok(_) => Err(Error::new(
            ErrorKind::Storage,
            format!("RabbitMQ refused the commit of offset {offset} to {queue}"),
        )),
        Err(e) => Err(error::map(
            format!("committing offset {offset} to {queue}"),
            e,
        )),
    }
}

/// The committed offset in the offset queue (`None`: nothing committed yet).
pub(crate) async fn committed(ch: &Channel, queue: &str) -> Result<Option<u64>> {
    let got = ch
        .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: false })
        .await
        .map_err(|e| error::map(format!("reading the committed offset in {queue}"), e))?;
    let Some(got) = got else { return Ok(None) };
    let text = String::from_utf8_lossy(&got.delivery.data).into_owned();
    got.delivery
        .acker
        .reject(BasicRejectOptions { requeue: true })
        .await
        .map_err(|e| error::map(format!("returning the committed offset to {queue}"), e))?;
    text.trim().parse().map(Some).map_err(|_| {
        Error::new(
            ErrorKind::Config,
            format!("{queue} holds {text:?}, not an offset: it was not written by Courier"),
        )
    })
}

/// Start a new group at the current end of one partition: consume from `next`, write a
/// marker, and commit the marker's offset once it comes back.
pub(crate) async fn start_at_end(
    conn: &Connection,
    stream: &str,
    offset_queue: &str,
    timeout: Duration,
) -> Result<()> {
    let ch = topology::open(conn, "finding a stream's end").await?;
    // Outlives the channel's close (see `topology::close_consumed`).
    let mut started = None;
    let r = async {
        ch.basic_qos(64, BasicQosOptions::default())
            .await
            .map_err(|e| error::map(format!("{stream}: setting the prefetch"), e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| error::map(format!("{stream}: enabling confirms"), e))?;
        let mut args = FieldTable::default();
        args.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString("next".into()),
        );
        let consumer = started.insert(
            ch.basic_consume(
                ShortString::from(stream),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .map_err(|e| error::map(format!("consuming {stream}"), e))?,
        );
        let marker = uuid::Uuid::now_v7().to_string();
        let confirm = ch
            .basic_publish(
                ShortString::from(""),
                ShortString::from(stream),
                BasicPublishOptions::default(),
                b"",
                codec::marker(&marker),
            )
            .await
            .map_err(|e| error::map(format!("writing a marker to {stream}"), e))?;
        confirm
            .await
            .map_err(|e| error::map(format!("writing a marker to {stream}"), e))?;
        let found = tokio::time::timeout(timeout, async {
            while let Some(d) = consumer.next().await {
                let d = d.map_err(|e| error::map(format!("consuming {stream}"), e))?;
                let _ = d.acker.ack(BasicAckOptions::default()).await;
                if codec::marker_of(&d.properties).as_deref() == Some(marker.as_str()) {
                    return Ok(codec::stream_offset(&d.properties));
                }
            }
            Ok(None)
        })
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!("the marker written to {stream} did not come back within {timeout:?}"),
            )
        })??;
        let offset = found.ok_or_else(|| {
            Error::new(
                ErrorKind::Unavailable,
                format!("{stream}: the consumer ended before the marker came back"),
            )
        })?;
        declare_offset_queue(&ch, offset_queue)
            .await
            .map_err(|e| error::map(format!("declaring {offset_queue}"), e))?;
        commit(&ch, offset_queue, offset).await
    }
    .await;
    topology::close_consumed(&ch, started).await;
    r
}
