//! Checks specific to PostgreSQL as a broker: fencing, offsets in commit order under
//! concurrent publishers, retention, introspection, malformed rows, connection errors.

use crate::support::{PgFactory, config, pg_url};
use courier_core::{ErrorKind, Message, Publisher, SubscribeOptions, Subscriber};
use courier_postgres::{ChannelInfo, PgBroker, PgBrokerConfig};
use courier_testkit::{TIMEOUT, collect, collect_acked, group, keyed, unique_channel, wait_until};
use sqlx::Connection;
use std::collections::HashSet;
use std::time::Duration;

async fn describe(b: &PgBroker, ch: &str) -> ChannelInfo {
    b.describe(Some(ch)).await.unwrap().remove(0)
}

/// A member whose heartbeats stopped (a long pause) loses its partition to a live member;
/// when it wakes up and commits, the commit is refused (fencing) and the offset does not
/// move; the new owner's commits do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_lease_was_taken_cannot_commit() {
    let Some(f) = PgFactory::start().await else {
        return;
    };
    let ch = unique_channel("fence");
    f.broker.create_channel(&ch, 1).await.unwrap();
    let grp = group("fence");
    // A: never heartbeats after joining (as if paused), commits every 10 ms.
    let mut stale =
        config(&f.schema.url, &f.schema.name).commit_interval(Duration::from_millis(10));
    stale.heartbeat_interval = Duration::from_secs(3600);
    let a = PgBroker::connect_with(stale).await.unwrap();
    let mut sub_a = a
        .subscribe(SubscribeOptions::new(ch.clone(), grp.clone()))
        .await
        .unwrap();
    let m = keyed(&ch, "k", 0);
    f.broker.publish(std::slice::from_ref(&m)).await.unwrap();
    let got_a = collect(&mut sub_a, 1, TIMEOUT).await.remove(0);
    assert_eq!(got_a.message.as_ref().ok().map(|x| x.id), Some(m.id));

    // B joins; A's heartbeat is older than the session timeout: B takes the partition
    // over and gets the unacknowledged message again.
    let b = f.open().await.unwrap();
    let mut sub_b = b
        .subscribe(SubscribeOptions::new(ch.clone(), grp.clone()))
        .await
        .unwrap();
    let got_b = collect(&mut sub_b, 1, TIMEOUT).await.remove(0);
    assert_eq!(got_b.message.as_ref().ok().map(|x| x.id), Some(m.id));
    let before = describe(&f.broker, ch.as_str()).await.groups.remove(0);
    let owner_b = before.partitions[0].owner.clone();
    assert!(owner_b.is_some(), "{before:?}");

    // A wakes up and acks: its commit is fenced.
    got_a.ack().await.unwrap();
    wait_until(TIMEOUT, "A's offset commit was refused", || {
        let n = a.stats().fenced_commits;
        async move { n >= 1 }
    })
    .await;
    let after = describe(&f.broker, ch.as_str()).await.groups.remove(0);
    assert_eq!(
        after.partitions[0].committed, 0,
        "a fenced commit moved the offset: {after:?}"
    );
    assert_eq!(after.partitions[0].owner, owner_b, "{after:?}");
    assert_eq!(
        after.partitions[0].generation,
        before.partitions[0].generation
    );

    // The owner's ack does move it.
    got_b.ack().await.unwrap();
    wait_until(TIMEOUT, "B committed offset 1", || {
        let b = f.broker.clone();
        let ch = ch.clone();
        async move { describe(&b, ch.as_str()).await.groups[0].partitions[0].committed == 1 }
    })
    .await;
    drop(sub_a);
    drop(sub_b);
}

/// The hazard of sequence numbers on PostgreSQL: transaction T1 takes offset N and is
/// slow to commit; a second publisher must not take N+1 and commit first (a reader at N+1
/// would skip N forever). It waits on T1's counter row lock, gets N+1 after T1 commits,
/// and a consumer sees N then N+1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_follow_commit_order() {
    let Some(f) = PgFactory::start().await else {
        return;
    };
    let ch = unique_channel("order");
    f.broker.create_channel(&ch, 1).await.unwrap();
    let s = f.open().await.unwrap();
    let mut sub = s
        .subscribe(SubscribeOptions::new(ch.clone(), group("order")))
        .await
        .unwrap();

    // T1: a publisher that took its offset and has not committed yet (the broker's
    // protocol, step by step).
    let first = keyed(&ch, "k", 0);
    let mut conn = f.schema.connection().await;
    let mut t1 = conn.begin().await.unwrap();
    let xid: i64 = sqlx::query_scalar("SELECT (pg_current_xact_id()::text::bigint % 4294967296)")
        .fetch_one(&mut *t1)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar(
        "UPDATE courier_broker_partitions SET head = head + 1
         WHERE channel = $1 AND partition = 0 RETURNING head",
    )
    .bind(ch.as_str())
    .fetch_one(&mut *t1)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO courier_broker_log (channel, partition, seq, message_id, headers, payload)
         VALUES ($1, 0, $2, $3, $4, $5)",
    )
    .bind(ch.as_str())
    .bind(n)
    .bind(first.id.to_string())
    .bind(first.headers.to_json())
    .bind(first.payload.to_vec())
    .execute(&mut *t1)
    .await
    .unwrap();

    // T2: a publish through the broker, which must wait for T1.
    let second = keyed(&ch, "k", 1);
    let broker = f.broker.clone();
    let to_send = second.clone();
    let t2 = tokio::spawn(async move { broker.publish(&[to_send]).await });
    wait_until(TIMEOUT, "the second publisher waits for T1's lock", || {
        let url = f.schema.url.clone();
        async move {
            let mut c = sqlx::postgres::PgConnection::connect(&url).await.unwrap();
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid'
                 AND NOT granted AND transactionid::text::bigint = $1",
            )
            .bind(xid)
            .fetch_one(&mut c)
            .await
            .unwrap();
            let _ = c.close().await;
            waiting > 0
        }
    })
    .await;
    assert!(!t2.is_finished(), "the second publish committed before T1");
    t1.commit().await.unwrap();
    let receipt = t2.await.unwrap().unwrap();
    let pos = receipt.positions[0].unwrap();
    assert_eq!(
        pos.offset,
        n as u64 + 1,
        "the later commit got a lower offset"
    );

    let got = collect(&mut sub, 2, TIMEOUT).await;
    let order: Vec<_> = got
        .iter()
        .map(|d| {
            (
                d.message.as_ref().map(|m| m.id).ok(),
                d.position.map(|p| p.offset),
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            (Some(first.id), Some(n as u64)),
            (Some(second.id), Some(n as u64 + 1))
        ]
    );
    for d in got {
        d.ack().await.unwrap();
    }
}

/// Many publishers at once on one partition while a consumer reads concurrently: the
/// consumer gets every message exactly once, at dense, increasing offsets (no row that
/// committed late was skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_never_skip_a_row() {
    let Some(f) = PgFactory::start().await else {
        return;
    };
    let ch = unique_channel("race");
    f.broker.create_channel(&ch, 1).await.unwrap();
    let s = f.open().await.unwrap();
    let mut sub = s
        .subscribe(SubscribeOptions::new(ch.clone(), group("race")))
        .await
        .unwrap();
    const PUBLISHERS: usize = 4;
    const EACH: u64 = 50;
    let mut tasks = Vec::new();
    let mut sent = HashSet::new();
    for p in 0..PUBLISHERS {
        // Brokers of their own: several pools, truly concurrent transactions.
        let b = f.open().await.unwrap();
        let msgs: Vec<Message> = (0..EACH).map(|i| keyed(&ch, &format!("p{p}"), i)).collect();
        sent.extend(msgs.iter().map(|m| m.id));
        tasks.push(tokio::spawn(async move {
            for m in msgs {
                b.publish(std::slice::from_ref(&m)).await.unwrap();
            }
        }));
    }
    let got = collect(&mut sub, sent.len(), TIMEOUT).await;
    for t in tasks {
        t.await.unwrap();
    }
    let offsets: Vec<u64> = got.iter().map(|d| d.position.unwrap().offset).collect();
    let expected: Vec<u64> = (1..=sent.len() as u64).collect();
    assert_eq!(offsets, expected, "offsets not dense and increasing");
    let ids: HashSet<_> = got.iter().map(|d| d.message.as_ref().unwrap().id).collect();
    assert_eq!(ids, sent);
    for d in got {
        d.ack().await.unwrap();
    }
}

/// Consumed messages older than the retention are deleted in small batches; a channel no
/// group reads keeps its messages; `describe` shows offsets, owners and lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_only_consumed_messages() {
    let Some(f) = PgFactory::start().await else {
        return;
    };
    let consumed = unique_channel("pruned");
    let unread = unique_channel("kept");
    f.broker.create_channel(&consumed, 2).await.unwrap();
    let msgs: Vec<Message> = (0..10)
        .map(|i| keyed(&consumed, &format!("k{i}"), 0))
        .collect();
    let kept: Vec<Message> = (0..10)
        .map(|i| keyed(&unread, &format!("k{i}"), 0))
        .collect();
    f.broker.publish(&msgs).await.unwrap();
    f.broker.publish(&kept).await.unwrap();

    let cfg = config(&f.schema.url, &f.schema.name).retention(
        Duration::ZERO,
        Duration::from_millis(20),
        3,
    );
    let s = PgBroker::connect_with(cfg).await.unwrap();
    let mut sub = s
        .subscribe(SubscribeOptions::new(consumed.clone(), group("pruned")))
        .await
        .unwrap();
    collect_acked(&mut sub, msgs.len(), TIMEOUT).await;
    wait_until(TIMEOUT, "consumed messages are pruned", || {
        let b = f.broker.clone();
        let ch = consumed.clone();
        async move { describe(&b, ch.as_str()).await.messages == 0 }
    })
    .await;
    let info = describe(&f.broker, consumed.as_str()).await;
    assert_eq!(info.partitions, 2);
    let g = &info.groups[0];
    assert_eq!((g.members, g.lag), (1, 0), "{info:?}");
    for (p, gp) in info.partition_info.iter().zip(&g.partitions) {
        assert_eq!(gp.committed, p.head, "{info:?}");
        assert!(gp.owner.is_some(), "{info:?}");
    }
    assert_eq!(s.prune(Duration::ZERO).await.unwrap(), 0);
    let kept_info = describe(&f.broker, unread.as_str()).await;
    assert_eq!(kept_info.messages, 10, "{kept_info:?}");
    assert!(kept_info.groups.is_empty());
    drop(sub);
}

/// Rows a foreign writer stored that are not valid messages arrive as `Err(Malformed)`
/// with the reason, and do not block the valid message behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rows_are_delivered_as_such() {
    let Some(f) = PgFactory::start().await else {
        return;
    };
    let ch = unique_channel("garbage");
    f.broker.create_channel(&ch, 1).await.unwrap();
    let mut conn = f.schema.connection().await;
    sqlx::query(
        "WITH h AS (UPDATE courier_broker_partitions SET head = head + 1
                    WHERE channel = $1 AND partition = 0 RETURNING head)
         INSERT INTO courier_broker_log (channel, partition, seq, message_id, headers, payload)
         SELECT $1, 0, head, 'not-a-uuid', '{}', 'x'::bytea FROM h",
    )
    .bind(ch.as_str())
    .execute(&mut conn)
    .await
    .unwrap();
    let valid = keyed(&ch, "k", 0);
    f.broker
        .publish(std::slice::from_ref(&valid))
        .await
        .unwrap();
    let s = f.open().await.unwrap();
    let mut sub = s
        .subscribe(SubscribeOptions::new(ch.clone(), group("garbage")))
        .await
        .unwrap();
    let got = collect(&mut sub, 2, TIMEOUT).await;
    let bad = got[0].message.as_ref().unwrap_err();
    assert_eq!(bad.raw_id, "not-a-uuid");
    assert!(bad.reason.contains("not-a-uuid"), "{}", bad.reason);
    assert_eq!(got[1].message.as_ref().ok(), Some(&valid));
    for d in got {
        d.ack().await.unwrap();
    }
}

/// A channel keeps its partition count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_count_is_fixed() {
    let Some(f) = PgFactory::start().await else {
        return;
    };
    let ch = unique_channel("fixed");
    f.broker.create_channel(&ch, 3).await.unwrap();
    f.broker.create_channel(&ch, 3).await.unwrap();
    let e = f.broker.create_channel(&ch, 5).await.unwrap_err();
    assert!(!e.is_retryable(), "{e:?}");
    assert!(e.to_string().contains("3 partitions"), "{e}");
}

/// Unreachable server: transient, names the URL without its password.
#[tokio::test]
async fn unreachable_server_is_a_clear_transient_error() {
    let e = PgBroker::connect("postgres://alice:s3cret@127.0.0.1:1/test")
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    assert!(text.contains("running and reachable"), "{text}");
    assert!(e.is_retryable(), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:?}");
}

/// Not a PostgreSQL URL: permanent, says what is expected.
#[tokio::test]
async fn a_bad_url_is_a_permanent_error() {
    let e = PgBroker::connect("mysql://bob:pw@db/x").await.unwrap_err();
    assert!(!e.is_retryable(), "{e:?}");
    assert!(e.to_string().contains("not a PostgreSQL URL"), "{e}");
    assert!(!e.to_string().contains(":pw@"), "{e}");
}

/// Wrong role or database: permanent configuration errors that say what to check.
#[tokio::test]
async fn wrong_credentials_are_a_permanent_error() {
    let Some(url) = pg_url() else { return };
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let host = format!("{}:{}", options.get_host(), options.get_port());
    for bad in [
        format!("postgres://no_such_role_courier:s3cret@{host}/test"),
        format!("postgres://postgres:s3cret@{host}/no_such_db_courier"),
    ] {
        let e = PgBroker::connect_with(PgBrokerConfig::new(bad.clone()))
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(!e.is_retryable(), "{bad}: {e:?}");
        assert_eq!(e.kind(), ErrorKind::Config, "{bad}: {e:?}");
        assert!(
            text.contains("check the user, password and database"),
            "{text}"
        );
        assert!(!text.contains("s3cret"), "{text}");
    }
}

/// Set in the child process of [`killed_member_loses_nothing`]: `url|schema|channel|group|n`.
const CHILD_ENV: &str = "COURIER_PG_BROKER_TEST_CHILD";

/// The group member that [`killed_member_loses_nothing`] runs in a child process and
/// kills: receives `n` messages, acks every third, prints what it acked, then `READY`,
/// and waits to be killed. Without the environment variable it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let [url, schema, ch, grp, n] = parts[..] else {
        panic!("bad {CHILD_ENV}: {spec:?}");
    };
    let broker = PgBroker::connect_with(config(url, schema)).await.unwrap();
    let ch = courier_core::ChannelName::new(ch).unwrap();
    let grp = courier_core::GroupName::new(grp).unwrap();
    let mut sub = broker
        .subscribe(SubscribeOptions::new(ch, grp))
        .await
        .unwrap();
    let mut keep = Vec::new();
    for (i, d) in collect(&mut sub, n.parse().unwrap(), TIMEOUT)
        .await
        .into_iter()
        .enumerate()
    {
        if i % 3 == 1 {
            let id = d.message.as_ref().unwrap().id;
            d.ack().await.unwrap();
            println!("ACKED {id}");
        } else {
            keep.push(d);
        }
    }
    println!("READY");
    std::future::pending::<()>().await;
}

/// A member process is killed (no goodbye: its connections just drop) while holding
/// unacknowledged messages; after its session times out, the next member gets every
/// message it left unacknowledged, in order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_member_loses_nothing() {
    use std::io::BufRead;
    let Some(f) = PgFactory::start().await else {
        return;
    };
    let ch = unique_channel("killed");
    f.broker.create_channel(&ch, 2).await.unwrap();
    let grp = group("killed");
    let sent: Vec<Message> = (0..4)
        .flat_map(|seq| (0..3).map(move |k| (k, seq)))
        .map(|(k, seq)| keyed(&ch, &format!("key-{k}"), seq))
        .collect();
    f.broker.publish(&sent).await.unwrap();
    let spec = format!(
        "{}|{}|{}|{}|{}",
        f.schema.url,
        f.schema.name,
        ch,
        grp,
        sent.len()
    );
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "broker::crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, spec)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        let mut acked = HashSet::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(|l| l.ok())
        {
            if let Some((_, id)) = line.trim().split_once("ACKED ") {
                acked.insert(id.to_owned());
            } else if line.trim().ends_with("READY") {
                return Some(acked);
            }
        }
        None
    });
    let ready = tokio::time::timeout(TIMEOUT, ready).await;
    let _ = child.kill();
    let _ = child.wait();
    let Ok(Ok(Some(acked))) = ready else {
        panic!("the child member never got its messages");
    };
    let unacked: HashSet<_> = sent
        .iter()
        .filter(|m| !acked.contains(&m.id.to_string()))
        .map(|m| m.id)
        .collect();
    assert_eq!(unacked.len(), sent.len() - sent.len() / 3);

    let journal = courier_testkit::Journal::new();
    let s = f.open().await.unwrap();
    let b = courier_testkit::Member::spawn(
        "b",
        s.subscribe(SubscribeOptions::new(ch.clone(), grp.clone()))
            .await
            .unwrap(),
        journal.clone(),
    );
    wait_until(
        TIMEOUT,
        "b received every message the killed member left unacknowledged",
        || {
            let done = journal.has_all(&unacked);
            async move { done }
        },
    )
    .await;
    let firsts: Vec<Message> = journal
        .first_times()
        .into_iter()
        .map(|s| s.message)
        .collect();
    courier_testkit::assert_per_key_order(&firsts);
    b.leave().await;
}

/// A batch larger than one `INSERT` statement is stored whole, in order, with dense
/// offsets per partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_are_split_into_statements() {
    let Some(f) = PgFactory::start().await else {
        return;
    };
    let ch = unique_channel("batch");
    f.broker.create_channel(&ch, 2).await.unwrap();
    let sent: Vec<Message> = (0..600)
        .map(|i| keyed(&ch, &format!("k{}", i % 7), i))
        .collect();
    let receipt = f.broker.publish(&sent).await.unwrap();
    let mut per_partition = std::collections::HashMap::new();
    for pos in receipt.positions.iter().map(|p| p.unwrap()) {
        let last = per_partition.entry(pos.partition).or_insert(0);
        assert_eq!(pos.offset, *last + 1, "offsets not dense: {pos:?}");
        *last = pos.offset;
    }
    let s = f.open().await.unwrap();
    let mut sub = s
        .subscribe(SubscribeOptions::new(ch.clone(), group("batch")))
        .await
        .unwrap();
    let got = collect_acked(&mut sub, sent.len(), TIMEOUT).await;
    courier_testkit::assert_per_key_order(&got);
    let ids: HashSet<_> = got.iter().map(|m| m.id).collect();
    assert_eq!(ids, sent.iter().map(|m| m.id).collect::<HashSet<_>>());
}

/// Reading without a group (`courier tail`): per-partition cursors, wake-ups on publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_reads_without_joining_a_group() {
    let Some(f) = PgFactory::start().await else {
        return;
    };
    let ch = unique_channel("tail");
    f.broker.create_channel(&ch, 2).await.unwrap();
    assert_eq!(f.broker.heads(&ch).await.unwrap(), vec![0, 0]);
    let reader = f.open().await.unwrap();
    let mut changes = reader.changes(&ch);
    let sent: Vec<Message> = (0..6).map(|i| keyed(&ch, &format!("k{i}"), 0)).collect();
    f.broker.publish(&sent).await.unwrap();
    tokio::time::timeout(TIMEOUT, changes.changed())
        .await
        .expect("a publish by another broker wakes the reader (LISTEN)");
    let got = reader.read_after(&ch, &[], 100).await.unwrap();
    assert_eq!(got.len(), sent.len());
    let mut cursors = vec![0u64; 2];
    for (pos, m) in &got {
        assert!(m.is_ok());
        assert!(pos.offset > cursors[pos.partition as usize], "{got:?}");
        cursors[pos.partition as usize] = pos.offset;
    }
    assert_eq!(reader.heads(&ch).await.unwrap(), cursors);
    let more = keyed(&ch, "k0", 1);
    f.broker.publish(std::slice::from_ref(&more)).await.unwrap();
    let next = reader.read_after(&ch, &cursors, 100).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].1.as_ref().ok(), Some(&more));
    assert!(
        f.broker.describe(Some(ch.as_str())).await.unwrap()[0]
            .groups
            .is_empty()
    );
}

/// The delay of a nack is stored: when the member that nacked goes away, the next owner
/// waits out the rest of the delay (other messages flow meanwhile), then redelivers it
/// with its redelivery count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_delay_survives_the_member() {
    const DELAY: Duration = Duration::from_millis(1500);
    let Some(f) = PgFactory::start().await else {
        return;
    };
    let ch = unique_channel("delay");
    f.broker.create_channel(&ch, 1).await.unwrap();
    let grp = group("delay");
    let slow = keyed(&ch, "slow", 0);
    f.broker.publish(std::slice::from_ref(&slow)).await.unwrap();
    let a = f.open().await.unwrap();
    let mut sub_a = a
        .subscribe(SubscribeOptions::new(ch.clone(), grp.clone()))
        .await
        .unwrap();
    let d = collect(&mut sub_a, 1, TIMEOUT).await.remove(0);
    let nacked_at = std::time::Instant::now();
    d.nack(DELAY).await.unwrap();
    drop(sub_a);
    drop(a);

    let fast = keyed(&ch, "fast", 0);
    f.broker.publish(std::slice::from_ref(&fast)).await.unwrap();
    let b = f.open().await.unwrap();
    let mut sub_b = b
        .subscribe(SubscribeOptions::new(ch.clone(), grp.clone()))
        .await
        .unwrap();
    let first = collect(&mut sub_b, 1, TIMEOUT).await.remove(0);
    assert_eq!(
        first.message.as_ref().ok().map(|m| m.id),
        Some(fast.id),
        "the nacked message came back before its delay ({:?} after the nack)",
        nacked_at.elapsed()
    );
    first.ack().await.unwrap();
    let again = collect(&mut sub_b, 1, TIMEOUT).await.remove(0);
    let elapsed = nacked_at.elapsed();
    assert_eq!(again.message.as_ref().ok().map(|m| m.id), Some(slow.id));
    assert!(
        elapsed >= DELAY.mul_f32(0.75),
        "nacked with {DELAY:?}, back after {elapsed:?}"
    );
    assert_eq!(again.redeliveries, 1);
    again.ack().await.unwrap();
}
