//! Connections and the broker objects of a channel: the partition-count marker and one
//! stream per partition.

use crate::config::AmqpConfig;
use crate::error::{self, code};
use crate::names;
use courier_core::{ChannelName, Error, ErrorKind, ErrorStatus, Result};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer};

/// Open a connection named after `purpose`, within the configured timeout, with an
/// error that names the (redacted) URL and what to check.
pub(crate) async fn connect(config: &AmqpConfig, purpose: &str) -> Result<Connection> {
    let url = error::redact(&config.url);
    if config
        .url
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("amqps://")
    {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "cannot connect to RabbitMQ at {url}: this build of courier-amqp has no TLS \
                 support (amqps); use amqp:// on a trusted network or a TLS-terminating proxy"
            ),
        ));
    }
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!("courier-amqp {purpose}")));
    let hint = "check that RabbitMQ is running and reachable there, that the user and \
                password in the URL are right and that the user may use the vhost (the \
                URL's path, `%2f` for `/`)";
    match tokio::time::timeout(
        config.connect_timeout,
        Connection::connect(&config.url, props),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => {
            let refused = error::is(&e, code::ACCESS_REFUSED) || error::is(&e, code::NOT_ALLOWED);
            let mapped = error::map(format!("cannot connect to RabbitMQ at {url}; {hint}"), e);
            // A refused login stays refused; anything else (not running yet, restarting,
            // network) may pass on a later try.
            Err(if refused {
                mapped.with_status(ErrorStatus::Permanent)
            } else {
                mapped.with_status(ErrorStatus::Transient)
            })
        }
        Err(_) => Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "cannot connect to RabbitMQ at {url} within {:?}; {hint}",
                config.connect_timeout
            ),
        )),
    }
}

/// A fresh AMQP channel (a failed declaration closes the channel it ran on, so probes
/// and declarations each get their own).
pub(crate) async fn open(conn: &Connection, what: &str) -> Result<Channel> {
    conn.create_channel()
        .await
        .map_err(|e| error::map(format!("opening an AMQP channel for {what}"), e))
}

/// Close an AMQP channel, ignoring errors (it may already be closed).
pub(crate) async fn close(channel: &Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, ShortString::from("bye")).await;
    }
}

/// Close `channel`, then drop `consumer`, a consumer on it (if it was started). lapin
/// cancels an active consumer in the background when it is dropped: dropped before the
/// close, that `basic.cancel` can be sent after the `channel.close`, on a channel
/// RabbitMQ has already closed, and RabbitMQ answers by closing the whole connection
/// ("CHANNEL_ERROR - expected 'channel.open'"), failing everything else on it. Closing
/// first marks the channel's consumers as cancelled, so dropping them sends nothing.
pub(crate) async fn close_consumed(channel: &Channel, consumer: Option<Consumer>) {
    close(channel).await;
    drop(consumer);
}

fn stream_args(config: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    if let Some(age) = config.stream_max_age {
        args.insert(
            "x-max-age".into(),
            AMQPValue::LongString(format!("{}s", age.as_secs().max(1)).into()),
        );
    }
    if let Some(bytes) = config.stream_max_bytes {
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(bytes).unwrap_or(i64::MAX)),
        );
    }
    args
}

fn meta_args(partitions: u32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::from(partitions)),
    );
    args
}

/// The partition count in a PRECONDITION_FAILED text about the marker's `x-max-length`
/// ("... received '8' but current is '4'", or "... current is the value '4' of type
/// ..." in other RabbitMQ versions).
pub(crate) fn parse_current(text: &str) -> Option<u32> {
    let rest = text.split("current is ").nth(1)?;
    let rest = rest.strip_prefix("the value ").unwrap_or(rest);
    rest.strip_prefix('\'')?.split('\'').next()?.parse().ok()
}

/// Make sure `channel` exists, creating it with `partitions` partitions if it does not,
/// and return its partition count. `explicit`: the caller asked for exactly that count,
/// so another existing count is an error.
pub(crate) async fn ensure_channel(
    conn: &Connection,
    config: &AmqpConfig,
    channel: &ChannelName,
    partitions: u32,
    explicit: bool,
) -> Result<u32> {
    let meta = names::meta(channel);
    let ch = open(conn, "declaring a channel").await?;
    let declared = ch
        .queue_declare(
            ShortString::from(meta.as_str()),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            meta_args(partitions),
        )
        .await;
    close(&ch).await;
    let n = match declared {
        Ok(_) => partitions,
        Err(e) if error::is(&e, code::PRECONDITION_FAILED) => {
            let text = error::reply(&e).map(|(_, t)| t).unwrap_or_default();
            match parse_current(&text) {
                Some(have) if explicit => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "channel {channel} already exists with {have} partitions, not \
                             {partitions}; the partition count of a channel cannot change \
                             (every process must use the same count)"
                        ),
                    ));
                }
                Some(have) => have,
                None => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "channel {channel}: the queue {meta} exists with other arguments \
                             than a Courier channel of {partitions} partitions ({text}); it \
                             was not created by Courier or with another partition count"
                        ),
                    ));
                }
            }
        }
        Err(e) => {
            return Err(error::map(
                format!("declaring channel {channel} (queue {meta})"),
                e,
            ));
        }
    };
    let ch = open(conn, "declaring a channel's streams").await?;
    for p in 0..n {
        let name = names::stream(channel, p);
        let r = ch
            .queue_declare(
                ShortString::from(name.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                stream_args(config),
            )
            .await;
        if let Err(e) = r {
            close(&ch).await;
            return Err(error::map(
                format!("declaring stream {name} of channel {channel}"),
                e,
            ));
        }
    }
    close(&ch).await;
    Ok(n)
}

/// Whether queue `name` exists (a passive declaration on a throw-away channel).
pub(crate) async fn exists(conn: &Connection, name: &str) -> Result<bool> {
    let ch = open(conn, "probing a queue").await?;
    let r = ch
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    close(&ch).await;
    match r {
        Ok(_) => Ok(true),
        Err(e) if error::is(&e, code::NOT_FOUND) => Ok(false),
        // An exclusive queue of another connection exists, too.
        Err(e) if error::is(&e, code::RESOURCE_LOCKED) => Ok(true),
        Err(e) => Err(error::map(format!("probing queue {name}"), e)),
    }
}

/// Delete queues by name, ignoring those already gone.
pub(crate) async fn delete_queues(conn: &Connection, queues: &[String]) -> Result<()> {
    for q in queues {
        let ch = open(conn, "deleting queues").await?;
        let r = ch
            .queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
            .await;
        close(&ch).await;
        match r {
            Ok(_) => {}
            Err(e) if error::is(&e, code::NOT_FOUND) => {}
            // A live member's exclusive lock: it disappears with that member's connection.
            Err(e) if error::is(&e, code::RESOURCE_LOCKED) => {}
            Err(e) => return Err(error::map(format!("deleting queue {q}"), e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tls_urls_are_refused_permanently() {
        let config = AmqpConfig {
            url: "amqps://u:secret@h:5671/%2f".to_owned(),
            ..AmqpConfig::default()
        };
        let e = connect(&config, "test").await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("amqps://***@h:5671/%2f"), "{e}");
    }

    #[test]
    fn parses_the_current_count() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue \
                    'courier:c:meta' in vhost '/': received the value '8' of type \
                    'signedint' but current is the value '4' of type 'long'";
        assert_eq!(parse_current(text), Some(4));
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue \
                    'courier:c:meta' in vhost '/': received '8' but current is '16'";
        assert_eq!(parse_current(text), Some(16));
        assert_eq!(parse_current("something else"), None);
    }
}
