//! The transport conformance suite (`courier-testkit`) against a real NATS JetStream
//! server at `COURIER_TEST_NATS_URL`, plus NATS-specific checks.
//!
//! Without `COURIER_TEST_NATS_URL` every test prints why it skips and passes, except when
//! `CI` is set: there a missing server is a failure. Each subscriber is its own
//! connection (like another process). Channels have unique names; the streams a test
//! created are deleted when its factory is dropped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::HeaderMap;
use courier_core::transport::BoxFuture;
use courier_core::{
    Capabilities, ChannelName, ErrorKind, Message, Publisher, Result, SubscribeOptions, Subscriber,
};
use courier_nats::{NatsConfig, NatsTransport};
use courier_testkit::{TIMEOUT, TransportFactory, collect, group, keyed, unique_channel};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The server URL, or `None` (with a printed reason) when the tests should skip.
fn url() -> Option<String> {
    match std::env::var("COURIER_TEST_NATS_URL") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ if std::env::var_os("CI").is_some() => {
            panic!("COURIER_TEST_NATS_URL must be set in CI")
        }
        _ => {
            eprintln!(
                "skipped: COURIER_TEST_NATS_URL is not set (e.g. nats://127.0.0.1:4222 with \
                 nats-server -js running)"
            );
            None
        }
    }
}

/// Short liveness so rebalances take a few hundred milliseconds; a short `ack_wait` so
/// a crashed member's messages come back quickly; streams expire after an hour in case
/// a test run is killed before it deletes them.
fn config(url: String) -> NatsConfig {
    NatsTransport::builder()
        .url(url)
        .leases_bucket("COURIER_TEST_LEASES")
        .liveness(Duration::from_millis(100), Duration::from_millis(1000))
        .ack_wait(Duration::from_secs(2))
        .fetch_wait(Duration::from_millis(250))
        .stream_max_age(Some(Duration::from_secs(3600)))
        .build_config()
}

/// Fresh transports (connections) on one server; remembers the channels it saw so it
/// can delete their streams at the end.
struct NatsFactory {
    config: NatsConfig,
    transport: NatsTransport,
    channels: Arc<Mutex<HashSet<ChannelName>>>,
}

async fn factory() -> Option<NatsFactory> {
    // `RUST_LOG=courier_nats=debug` shows heartbeats, claims and hand-overs.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let config = config(url()?);
    let transport = NatsTransport::connect_with(config.clone())
        .await
        .unwrap_or_else(|e| panic!("connecting to the test server failed: {e}"));
    Some(NatsFactory {
        config,
        transport,
        channels: Arc::default(),
    })
}

/// A publisher that writes down the channels it publishes to (for clean-up).
struct Recording {
    inner: NatsTransport,
    channels: Arc<Mutex<HashSet<ChannelName>>>,
}

impl Publisher for Recording {
    fn publish<'a>(
        &'a self,
        messages: &'a [Message],
    ) -> BoxFuture<'a, Result<courier_core::Receipt>> {
        if let Ok(mut c) = self.channels.lock() {
            c.extend(messages.iter().filter_map(|m| m.channel().ok()));
        }
        self.inner.publish(messages)
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

impl TransportFactory for NatsFactory {
    fn publisher(&self) -> BoxFuture<'_, Result<Arc<dyn Publisher>>> {
        Box::pin(async move {
            Ok(Arc::new(Recording {
                inner: self.transport.clone(),
                channels: self.channels.clone(),
            }) as Arc<dyn Publisher>)
        })
    }

    fn subscriber(&self) -> BoxFuture<'_, Result<Arc<dyn Subscriber>>> {
        Box::pin(async move {
            Ok(
                Arc::new(NatsTransport::connect_with(self.config.clone()).await?)
                    as Arc<dyn Subscriber>,
            )
        })
    }

    fn capabilities(&self) -> Capabilities {
        self.transport.capabilities()
    }

    fn create_channel<'a>(
        &'a self,
        channel: &'a ChannelName,
        partitions: u32,
    ) -> BoxFuture<'a, Result<()>> {
        if let Ok(mut c) = self.channels.lock() {
            c.insert(channel.clone());
        }
        Box::pin(self.transport.create_channel(channel, partitions))
    }
}

impl Drop for NatsFactory {
    fn drop(&mut self) {
        let channels: Vec<ChannelName> = match self.channels.lock() {
            Ok(c) => c.iter().cloned().collect(),
            Err(_) => return,
        };
        if channels.is_empty() {
            return;
        }
        let config = self.config.clone();
        // Drop cannot await: delete on a thread with its own runtime and connection.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(t) = NatsTransport::connect_with(config).await else {
                    return;
                };
                for ch in channels {
                    if let Err(e) = t.delete_channel(&ch).await {
                        eprintln!("could not delete the stream of channel {ch}: {e}");
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

// Skip-aware: with no server configured, each test returns before building a factory.
courier_testkit::conformance_tests!(match factory().await {
    Some(f) => std::future::ready(f),
    None => return,
});

/// The whole suite on ONE transport factory, one test after the other, as
/// `run_conformance` runs it (a publisher connection shared across tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_suite_on_one_server() {
    let Some(f) = factory().await else { return };
    courier_testkit::run_conformance(f).await;
}

/// Messages stored by another NATS client without Courier's headers arrive as
/// `Err(Malformed)` with a reason, and do not block the valid message behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_are_malformed() {
    let Some(f) = factory().await else { return };
    let ch = unique_channel("foreign");
    f.create_channel(&ch, 1).await.unwrap();
    let subject = format!(
        "courier.{}.0",
        ch.as_str().replace('_', "__").replace('.', "_d")
    );
    let client = async_nats::connect(f.config.url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.publish(subject.clone(), "no headers".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut bad_id = HeaderMap::new();
    bad_id.insert("Nats-Msg-Id", "not-a-uuid");
    js.publish_with_headers(subject.clone(), bad_id, "bad id".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut bad_header = HeaderMap::new();
    bad_header.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
    bad_header.insert("Upper-Case", "v");
    js.publish_with_headers(subject, bad_header, "bad header".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let valid = keyed(&ch, "k", 0);
    let p = f.publisher().await.unwrap();
    p.publish(std::slice::from_ref(&valid)).await.unwrap();

    let s = f.subscriber().await.unwrap();
    let mut sub = s
        .subscribe(SubscribeOptions::new(ch.clone(), group("foreign")))
        .await
        .unwrap();
    let got = collect(&mut sub, 4, TIMEOUT).await;
    let reasons: Vec<String> = got[..3]
        .iter()
        .map(|d| match &d.message {
            Err(bad) => bad.reason.clone(),
            Ok(m) => panic!("a foreign message decoded as {m:?}"),
        })
        .collect();
    assert!(reasons[0].contains("Nats-Msg-Id"), "{}", reasons[0]);
    assert!(reasons[1].contains("not-a-uuid"), "{}", reasons[1]);
    assert!(reasons[2].contains("Upper-Case"), "{}", reasons[2]);
    assert_eq!(got[3].message.as_ref().ok(), Some(&valid));
    for d in got {
        d.ack().await.unwrap();
    }
}

/// An unreachable server gives an error that names the URL (without its password) and
/// says what to check; it is transient.
#[tokio::test]
async fn unreachable_server_is_a_clear_error() {
    let config = NatsTransport::builder()
        .url("nats://alice:s3cret@127.0.0.1:1")
        .build_config();
    let e = NatsTransport::connect_with(config).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    assert!(text.contains("nats-server"), "{text}");
    assert!(e.is_retryable(), "{e:?}");
    assert!(
        matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
        "{e:?}"
    );
}

/// A channel keeps its partition count: asking for another one is a permanent error.
#[tokio::test]
async fn partition_count_is_fixed() {
    let Some(f) = factory().await else { return };
    let ch = unique_channel("fixed");
    f.create_channel(&ch, 3).await.unwrap();
    f.create_channel(&ch, 3).await.unwrap();
    let e = f.create_channel(&ch, 5).await.unwrap_err();
    assert!(e.to_string().contains("3 partitions"), "{e}");
    assert!(!e.is_retryable());
}

/// Set in the environment of the child process [`killed_member_process`] starts.
const CHILD_ENV: &str = "COURIER_NATS_TEST_CHILD";

/// The child side of [`killed_member_process`]: joins the group named in its
/// environment, takes every message, acks every third (printing `ACKED <id>`), says
/// `READY` and hangs until it is killed. Run as a plain test it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_member() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split(' ');
    let (Some(url), Some(ch), Some(grp), Some(n)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        panic!("bad {CHILD_ENV}: {spec:?}");
    };
    let t = NatsTransport::connect_with(config(url.to_owned()))
        .await
        .unwrap();
    let mut sub = t
        .subscribe(SubscribeOptions::new(
            ChannelName::new(ch).unwrap(),
            courier_core::GroupName::new(grp).unwrap(),
        ))
        .await
        .unwrap();
    let mut held = Vec::new();
    for (i, d) in collect(&mut sub, n.parse().unwrap(), TIMEOUT)
        .await
        .into_iter()
        .enumerate()
    {
        if i % 3 == 1 {
            let id = d.message.as_ref().map(|m| m.id).unwrap();
            d.ack().await.unwrap();
            println!("ACKED {id}");
        } else {
            held.push(d);
        }
    }
    println!("READY");
    std::future::pending::<()>().await;
}

/// A member process is killed (SIGKILL, no goodbye) holding unacknowledged messages: the
/// next member gets every one of them once the dead member's leases expire, in order per
/// key, without waiting for `ack_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_member_process() {
    use courier_testkit::{Journal, Member, assert_per_key_order, wait_until};
    use std::io::BufRead;
    let Some(f) = factory().await else { return };
    let ch = unique_channel("killed");
    f.create_channel(&ch, 4).await.unwrap();
    let grp = group("killed");
    let sent: Vec<Message> = (0..6)
        .flat_map(|seq| (0..4).map(move |k| (k, seq)))
        .map(|(k, seq)| keyed(&ch, &format!("key-{k}"), seq))
        .collect();
    f.publisher().await.unwrap().publish(&sent).await.unwrap();

    let spec = format!("{} {ch} {grp} {}", f.config.url, sent.len());
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_member", "--nocapture", "--test-threads=1"])
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
            // The test harness may have written "test child_member ... " before it.
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

    let journal = Journal::new();
    let s = f.subscriber().await.unwrap();
    let b = Member::spawn(
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
    assert_per_key_order(&firsts);
    b.leave().await;
}
