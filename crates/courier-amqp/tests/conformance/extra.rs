//! RabbitMQ-specific checks: foreign messages, credentials, partition-count agreement,
//! clean-up.

use crate::support::{Created, cleanup, config, factory, url};
use courier_amqp::AmqpTransport;
use courier_core::{ErrorKind, Publisher, SubscribeOptions, Subscriber};
use courier_testkit::{TIMEOUT, collect, collect_acked, group, keyed, unique_channel};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// Whether `queue` exists (a passive declaration on a throw-away channel).
async fn exists(conn: &Connection, queue: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    r.is_ok()
}

/// A message written by another AMQP client (no message id, a non-string header) is
/// delivered as malformed with a reason, and the subscription goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_message_is_malformed() {
    let Some(f) = factory().await else { return };
    let ch = unique_channel("foreign");
    f.transport.create_channel(&ch, 1).await.unwrap();
    f.created.lock().unwrap().channels.insert(ch.clone());
    let conn = Connection::connect(&f.config.url, ConnectionProperties::default())
        .await
        .unwrap();
    let amqp = conn.create_channel().await.unwrap();
    amqp.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    headers.insert("Weird".into(), AMQPValue::LongLongInt(7));
    // The stream of partition 0 is `courier:<channel>:p0` (see the crate docs).
    amqp.basic_publish(
        "".into(),
        format!("courier:{ch}:p0").as_str().into(),
        BasicPublishOptions::default(),
        b"not courier",
        BasicProperties::default().with_headers(headers),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let good = keyed(&ch, "k", 1);
    f.transport
        .publish(std::slice::from_ref(&good))
        .await
        .unwrap();

    let s = AmqpTransport::connect_with(f.config.clone()).await.unwrap();
    let grp = group("foreign");
    f.created
        .lock()
        .unwrap()
        .groups
        .insert((ch.clone(), grp.clone()));
    let mut sub = s
        .subscribe(SubscribeOptions::new(ch.clone(), grp))
        .await
        .unwrap();
    let mut got = collect(&mut sub, 2, TIMEOUT).await.into_iter();
    let bad = got.next().unwrap();
    let reason = match &bad.message {
        Err(m) => m.reason.clone(),
        Ok(m) => panic!("a foreign message decoded as {m:?}"),
    };
    assert!(reason.contains("message_id"), "reason: {reason}");
    assert_eq!(
        bad.message.as_ref().unwrap_err().payload.as_ref(),
        b"not courier"
    );
    bad.ack().await.unwrap();
    let ok = got.next().unwrap();
    assert_eq!(ok.message.as_ref().unwrap().id, good.id);
    ok.ack().await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
}

/// Wrong credentials: a permanent error naming the redacted URL, never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_a_clear_permanent_error() {
    let Some(url) = url() else { return };
    let bad = url.replacen("guest:guest@", "guest:not-the-password@", 1);
    let mut cfg = config(bad);
    cfg.connect_timeout = std::time::Duration::from_secs(5);
    let e = AmqpTransport::connect_with(cfg).await.unwrap_err();
    let text = e.to_string();
    assert!(!text.contains("not-the-password"), "{text}");
    assert!(text.contains("***@"), "the URL is not named: {text}");
    assert!(text.contains("password"), "no hint what to check: {text}");
    assert!(
        !e.is_retryable(),
        "refused credentials must be permanent: {e:?}"
    );
}

/// Nothing listening: a transient error naming the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_transient_error() {
    if url().is_none() {
        return;
    }
    let e = AmqpTransport::connect("amqp://guest:secret@127.0.0.1:1/%2f")
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("amqp://***@127.0.0.1:1/%2f"), "{text}");
    assert!(!text.contains("secret"), "{text}");
    assert!(e.is_retryable(), "{e:?}");
}

/// Every process agrees on a channel's partition count: another explicit count is
/// refused, an implicit user takes the existing count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_count_disagreement_is_refused() {
    let Some(f) = factory().await else { return };
    let ch = unique_channel("agree");
    f.created.lock().unwrap().channels.insert(ch.clone());
    f.transport.create_channel(&ch, 4).await.unwrap();
    f.transport.create_channel(&ch, 4).await.unwrap();
    let other = AmqpTransport::builder()
        .config(f.config.clone())
        .default_partitions(8)
        .connect()
        .await
        .unwrap();
    let e = other.create_channel(&ch, 8).await.unwrap_err();
    assert!(
        e.to_string().contains("4 partitions") && e.to_string().contains("not 8"),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(!e.is_retryable());
    // An implicit publisher with another default uses the channel's 4 partitions.
    let msgs: Vec<_> = (0..20).map(|i| keyed(&ch, &format!("k{i}"), 0)).collect();
    other.publish(&msgs).await.unwrap();
    let grp = group("agree");
    f.created
        .lock()
        .unwrap()
        .groups
        .insert((ch.clone(), grp.clone()));
    let mut sub = other
        .subscribe(SubscribeOptions::new(ch.clone(), grp))
        .await
        .unwrap();
    let got = collect_acked(&mut sub, msgs.len(), TIMEOUT).await;
    assert_eq!(got.len(), msgs.len());
    let conn = Connection::connect(&f.config.url, ConnectionProperties::default())
        .await
        .unwrap();
    assert!(exists(&conn, &format!("courier:{ch}:p3")).await);
    assert!(!exists(&conn, &format!("courier:{ch}:p4")).await);
    let _ = conn.close(200, "bye".into()).await;
}

/// `delete_group` and `delete_channel` remove every queue and stream they created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_queues_and_streams() {
    let Some(f) = factory().await else { return };
    let ch = unique_channel("cleanup");
    let grp = group("cleanup");
    f.transport.create_channel(&ch, 2).await.unwrap();
    let m = keyed(&ch, "k", 0);
    f.transport.publish(std::slice::from_ref(&m)).await.unwrap();
    let mut sub = f
        .transport
        .subscribe(SubscribeOptions::new(ch.clone(), grp.clone()))
        .await
        .unwrap();
    collect_acked(&mut sub, 1, TIMEOUT).await;
    drop(sub);
    let conn = Connection::connect(&f.config.url, ConnectionProperties::default())
        .await
        .unwrap();
    let offsets: Vec<String> = (0..2)
        .map(|p| format!("courier:{ch}:{grp}:p{p}:offset"))
        .collect();
    assert!(exists(&conn, &offsets[0]).await || exists(&conn, &offsets[1]).await);
    let mut created = Created::default();
    created.channels.insert(ch.clone());
    created.groups.insert((ch.clone(), grp.clone()));
    cleanup(&f.transport, &created).await;
    for q in offsets
        .iter()
        .cloned()
        .chain([format!("courier:{ch}:meta"), format!("courier:{ch}:p0")])
        .chain([
            format!("courier:{ch}:p1"),
            format!("courier:{ch}:{grp}:members"),
        ])
    {
        assert!(!exists(&conn, &q).await, "{q} still exists");
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// A nacked message waits on the broker, not in the member: after its member left, the
/// next member of the group gets it after the delay, and nacking it again counts up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_message_outlives_its_member() {
    let Some(f) = factory().await else { return };
    let ch = unique_channel("nack-leave");
    let grp = group("nack-leave");
    f.created.lock().unwrap().channels.insert(ch.clone());
    f.created
        .lock()
        .unwrap()
        .groups
        .insert((ch.clone(), grp.clone()));
    let m = keyed(&ch, "k", 0);
    f.transport.publish(std::slice::from_ref(&m)).await.unwrap();
    let a = AmqpTransport::connect_with(f.config.clone()).await.unwrap();
    let mut sub_a = a
        .subscribe(SubscribeOptions::new(ch.clone(), grp.clone()))
        .await
        .unwrap();
    let d = collect(&mut sub_a, 1, TIMEOUT).await.remove(0);
    d.nack(std::time::Duration::from_millis(300)).await.unwrap();
    drop(sub_a);
    drop(a);

    let b = AmqpTransport::connect_with(f.config.clone()).await.unwrap();
    let mut sub_b = b
        .subscribe(SubscribeOptions::new(ch.clone(), grp.clone()))
        .await
        .unwrap();
    let again = collect(&mut sub_b, 1, TIMEOUT).await.remove(0);
    assert_eq!(again.message.as_ref().unwrap(), &m);
    assert_eq!(again.redeliveries, 1);
    again
        .nack(std::time::Duration::from_millis(100))
        .await
        .unwrap();
    let third = collect(&mut sub_b, 1, TIMEOUT).await.remove(0);
    assert_eq!(third.message.as_ref().unwrap().id, m.id);
    assert_eq!(third.redeliveries, 2);
    third.ack().await.unwrap();
}

/// A message RabbitMQ cannot route (its partition's stream was deleted behind the
/// transport's back) is a transient error naming the message and channel; the next
/// publish declares the channel again and succeeds. `Debug` never shows the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_message_is_an_error_naming_it() {
    let Some(f) = factory().await else { return };
    let shown = format!("{:?}", f.transport);
    assert!(!shown.contains("guest:guest"), "{shown}");
    let ch = unique_channel("unroutable");
    f.created.lock().unwrap().channels.insert(ch.clone());
    f.transport.create_channel(&ch, 1).await.unwrap();
    let conn = Connection::connect(&f.config.url, ConnectionProperties::default())
        .await
        .unwrap();
    let amqp = conn.create_channel().await.unwrap();
    amqp.queue_delete(
        format!("courier:{ch}:p0").as_str().into(),
        lapin::options::QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    let m = keyed(&ch, "k", 0);
    let e = f
        .transport
        .publish(std::slice::from_ref(&m))
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains(&m.id.to_string())
            && text.contains(ch.as_str())
            && text.contains("unroutable"),
        "{text}"
    );
    assert!(e.is_retryable(), "{e:?}");
    f.transport.publish(std::slice::from_ref(&m)).await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
}
