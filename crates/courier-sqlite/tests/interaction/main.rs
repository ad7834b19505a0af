//! Every interaction style between two services running as separate OS processes on the
//! embedded SQLite broker: commands with replies and typed failures, notifications,
//! domain events in two versions side by side (upcast) and an unknown third, scatter-
//! gather (complete and partial), `request().await` from another instance, a reply
//! handled by a restarted (kill -9) instance of the sender, deadline expiry (the command
//! is not executed late), and bad input (unknown correlation id, reply of the wrong type,
//! a command nobody handles).
//!
//! The test binary re-executes itself: `interaction role <name> <dir>` runs one service.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod messages;

use courier_core::{
    ChannelName, Codec, CommandReply, Correlation, Dispatcher, Gathered, GroupName, HandlerContext,
    MessageStore, NewCorrelation, Outcome, Rejection, SubscribeOptions, Subscriber, Subscription,
    headers, now_ms,
};
use courier_sqlite::{Relay, SqliteBroker, SqliteStore};
use messages::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

type Res<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("role") {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let (name, dir) = (args[2].clone(), PathBuf::from(&args[3]));
        if let Err(e) = rt.block_on(role(&name, &dir)) {
            eprintln!("role {name} failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    // `cargo test -- --list` and filters: this binary has one test.
    if args.iter().any(|a| a == "--list") {
        println!("interaction_styles_between_processes: test");
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    print!("test interaction_styles_between_processes ... ");
    match rt.block_on(interaction_styles_between_processes()) {
        Ok(()) => println!("ok\n\ntest result: ok. 1 passed; 0 failed"),
        Err(e) => {
            println!("FAILED\n{e}");
            std::process::exit(101);
        }
    }
}

async fn shutdown_never() {
    std::future::pending::<()>().await
}

async fn subscribe(broker: &SqliteBroker, channel: &str, group: &str) -> Res<Subscription> {
    Ok(broker
        .subscribe(SubscribeOptions::new(
            ChannelName::new(channel)?,
            GroupName::new(group)?,
        ))
        .await?)
}

/// The business tables of the test services (every service gets all of them).
async fn create_tables(store: &SqliteStore) -> Res {
    for ddl in [
        "CREATE TABLE IF NOT EXISTS executed (correlation_id TEXT, consumer_id TEXT)",
        "CREATE TABLE IF NOT EXISTS suspended (consumer_id TEXT PRIMARY KEY)",
        "CREATE TABLE IF NOT EXISTS outcomes (correlation_id TEXT PRIMARY KEY, outcome TEXT, data TEXT, responder TEXT)",
        "CREATE TABLE IF NOT EXISTS gathers (correlation_id TEXT PRIMARY KEY, responders TEXT, missing TEXT, timed_out INTEGER)",
        "CREATE TABLE IF NOT EXISTS events (consumer_id TEXT PRIMARY KEY, reason TEXT)",
    ] {
        sqlx::query(ddl).execute(store.pool()).await?;
    }
    Ok(())
}

/// One service process.
async fn role(name: &str, dir: &Path) -> Res {
    let broker = SqliteBroker::open(dir.join("broker.db")).await?;
    let store = SqliteStore::open(dir.join(format!("{name}.db"))).await?;
    create_tables(&store).await?;
    let group = GroupName::new(name)?;
    let relay = tokio::spawn(Relay::new(store.clone(), broker.clone()).run(shutdown_never()));
    let dispatcher = Dispatcher::new(store.clone(), group);
    let (dispatcher, subs) = match name {
        "consumer-service" => (
            dispatcher
                .on_command(|ctx: HandlerContext<SqliteStore>, cmd: ValidateConsumer| async move {
                    sqlx::query("INSERT INTO executed VALUES (?, ?)")
                        .bind(ctx.envelope().headers.correlation_id().unwrap_or(""))
                        .bind(&cmd.consumer_id)
                        .execute(&mut *ctx.tx().await)
                        .await?;
                    Ok(if cmd.consumer_id.starts_with("bad") {
                        Err(Rejection::new(format!("unknown consumer {}", cmd.consumer_id)))
                    } else {
                        Ok(ConsumerValidated {
                            consumer_id: cmd.consumer_id,
                        })
                    })
                })
                .on_notification(|ctx: HandlerContext<SqliteStore>, n: SuspendConsumer| async move {
                    sqlx::query("INSERT INTO suspended VALUES (?)")
                        .bind(&n.consumer_id)
                        .execute(&mut *ctx.tx().await)
                        .await?;
                    ctx.publish_event(&ConsumerSuspended {
                        consumer_id: n.consumer_id,
                        reason: "suspended by test".to_owned(),
                    })?;
                    Ok(())
                }),
            vec![subscribe(&broker, ValidateConsumer::CHANNEL_NAME, name).await?],
        ),
        "order-service" => (
            dispatcher
                .replies_to(ChannelName::new(REPLIES)?)
                .on_reply(|ctx: HandlerContext<SqliteStore>, r: CommandReply<ValidateConsumer>| async move {
                    let outcome = match &r.outcome {
                        Outcome::Replied(v) => format!("replied:{}", v.consumer_id),
                        Outcome::Failed(f) => format!("failed:{}", f.reason),
                        Outcome::TimedOut => "timed-out".to_owned(),
                    };
                    sqlx::query("INSERT INTO outcomes VALUES (?, ?, ?, ?)")
                        .bind(&r.correlation_id)
                        .bind(outcome)
                        .bind(r.raw_data())
                        .bind(&r.responder)
                        .execute(&mut *ctx.tx().await)
                        .await?;
                    Ok(())
                })
                .on_gathered(|ctx: HandlerContext<SqliteStore>, g: Gathered<QuoteRequest>| async move {
                    let mut who: Vec<String> = g.replies.iter().map(|r| match &r.outcome {
                        Outcome::Replied(q) => format!("{}={}", q.kitchen, q.cents),
                        _ => r.responder.clone(),
                    }).collect();
                    who.sort();
                    sqlx::query("INSERT INTO gathers VALUES (?, ?, ?, ?)")
                        .bind(&g.correlation_id)
                        .bind(who.join(","))
                        .bind(g.missing.join(","))
                        .bind(i64::from(g.timed_out))
                        .execute(&mut *ctx.tx().await)
                        .await?;
                    Ok(())
                })
                .on_event(|ctx: HandlerContext<SqliteStore>, e: ConsumerSuspended| async move {
                    sqlx::query("INSERT INTO events VALUES (?, ?)")
                        .bind(&e.consumer_id)
                        .bind(&e.reason)
                        .execute(&mut *ctx.tx().await)
                        .await?;
                    Ok(())
                })
                .upcast::<ConsumerSuspendedV1, ConsumerSuspended>(),
            vec![
                subscribe(&broker, REPLIES, name).await?,
                subscribe(&broker, "consumer", name).await?,
            ],
        ),
        kitchen => {
            let me = kitchen.to_owned();
            (
                dispatcher.on_command(move |_ctx: HandlerContext<SqliteStore>, q: QuoteRequest| {
                    let me = me.clone();
                    async move {
                        Ok(Ok(Quote {
                            kitchen: me,
                            cents: 100 + q.item.len() as i64,
                        }))
                    }
                }),
                vec![subscribe(&broker, QuoteRequest::CHANNEL_NAME, kitchen).await?],
            )
        }
    };
    println!("ready");
    dispatcher
        .run(Subscription::merge(subs), shutdown_never())
        .await?;
    relay.await??;
    Ok(())
}

/// `C::CHANNEL` as a `&str` constant for `subscribe`.
trait ChannelOf {
    const CHANNEL_NAME: &'static str;
}
impl<C: courier_core::Command> ChannelOf for C {
    const CHANNEL_NAME: &'static str = C::CHANNEL;
}

struct Service {
    name: String,
    dir: PathBuf,
    child: Child,
}

impl Service {
    fn start(name: &str, dir: &Path) -> Res<Self> {
        let exe = std::env::current_exe()?;
        let child = Process::new(exe)
            .args(["role", name])
            .arg(dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Self {
            name: name.to_owned(),
            dir: dir.to_owned(),
            child,
        })
    }

    /// kill -9.
    fn kill(&mut self) -> Res {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    fn restart(&mut self) -> Res {
        *self = Self::start(&self.name, &self.dir)?;
        Ok(())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait until `probe` returns `Some`, or fail after `limit` saying what was awaited.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> Res<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Res<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if start.elapsed() > limit {
            return Err(format!("timed out after {limit:?} waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn outcome(store: &SqliteStore, id: &str) -> Res<Option<(String, String, Option<String>)>> {
    Ok(
        sqlx::query_as("SELECT outcome, data, responder FROM outcomes WHERE correlation_id = ?")
            .bind(id)
            .fetch_optional(store.pool())
            .await?,
    )
}

async fn dead_letter(store: &SqliteStore, message_id: &str) -> Res<Option<(String, String)>> {
    Ok(
        sqlx::query_as("SELECT reason, error FROM courier_dead_letters WHERE message_id = ?")
            .bind(message_id)
            .fetch_optional(store.pool())
            .await?,
    )
}

const LIMIT: Duration = Duration::from_secs(60);

async fn interaction_styles_between_processes() -> Res {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let broker = SqliteBroker::open(dir.join("broker.db")).await?;
    let orders = SqliteStore::open(dir.join("order-service.db")).await?;
    let consumers_db = SqliteStore::open(dir.join("consumer-service.db")).await?;
    create_tables(&orders).await?;
    create_tables(&consumers_db).await?;
    let mut consumer = Service::start("consumer-service", dir)?;
    let mut sender = Service::start("order-service", dir)?;
    let _kitchen_a = Service::start("kitchen-a", dir)?;
    let _kitchen_b = Service::start("kitchen-b", dir)?;
    // The order service's relay runs here, so it keeps relaying while the order-service
    // process is killed.
    let relay = tokio::spawn(Relay::new(orders.clone(), broker.clone()).run(shutdown_never()));
    let outbox = orders.outbox().replies_to(ChannelName::new(REPLIES)?);

    let send = |cmd: ValidateConsumer, c: Correlation| {
        let (orders, outbox) = (orders.clone(), outbox.clone());
        async move {
            let mut tx = orders.begin().await?;
            let id = outbox.send_command(&mut tx, &cmd, c).await?;
            tx.commit().await?;
            Res::Ok(id.to_string())
        }
    };

    // 1. Command → reply, with the sender's data given back.
    let ok = send(
        ValidateConsumer {
            consumer_id: "c-1".into(),
        },
        Correlation::new()
            .data(&serde_json::json!({"order": "o-1"}))?
            .deadline_in(LIMIT),
    )
    .await?;
    let (o, data, responder) =
        wait_for("the reply to c-1", LIMIT, || outcome(&orders, &ok)).await?;
    assert_eq!(o, "replied:c-1");
    assert_eq!(data, r#"{"order":"o-1"}"#);
    assert_eq!(responder.as_deref(), Some("consumer-service"));

    // 2. Command → typed failure.
    let bad = send(
        ValidateConsumer {
            consumer_id: "bad-2".into(),
        },
        Correlation::new(),
    )
    .await?;
    let (o, _, _) = wait_for("the failure of bad-2", LIMIT, || outcome(&orders, &bad)).await?;
    assert_eq!(o, "failed:unknown consumer bad-2");

    // 3. Notification → its handler publishes a v2 domain event → the order service.
    let mut tx = orders.begin().await?;
    outbox
        .notify(
            &mut tx,
            &SuspendConsumer {
                consumer_id: "c-3".into(),
            },
            Some("c-3"),
        )
        .await?;
    tx.commit().await?;
    let event = |id: &'static str| {
        let orders = orders.clone();
        move || {
            let orders = orders.clone();
            async move {
                Res::Ok(
                    sqlx::query_scalar::<_, String>(
                        "SELECT reason FROM events WHERE consumer_id = ?",
                    )
                    .bind(id)
                    .fetch_optional(orders.pool())
                    .await?,
                )
            }
        }
    };
    assert_eq!(
        wait_for("event c-3", LIMIT, event("c-3")).await?,
        "suspended by test"
    );

    // 4. Version 1 of the same event, consumed beside version 2 through the upcast;
    //    version 3 (unknown major) is dead-lettered with that reason.
    use courier_core::Publisher;
    let v1 = courier_core::interaction::event_message(&ConsumerSuspendedV1 {
        consumer_id: "c-4".into(),
    })?;
    let v3 = Codec::encode_to(
        &ConsumerSuspendedV3 { id: 5 },
        &ChannelName::new("consumer")?,
    )?
    .with_key("c-5")?;
    let v3_id = v3.id.to_string();
    broker.publish(&[v1, v3]).await?;
    assert_eq!(
        wait_for("event c-4 (v1)", LIMIT, event("c-4")).await?,
        "unknown (v1)"
    );
    let (reason, error) =
        wait_for("v3 dead letter", LIMIT, || dead_letter(&orders, &v3_id)).await?;
    assert_eq!(reason, "undecodable");
    assert!(
        error.contains("major version 3") && error.contains(&v3_id),
        "{error}"
    );

    // 5. Scatter-gather: all expected answer (completes before the deadline), and one
    //    missing (ends at the deadline, says who did not answer).
    let gather = |expect: Vec<&'static str>, deadline: Duration| {
        let (orders, outbox) = (orders.clone(), outbox.clone());
        async move {
            let mut tx = orders.begin().await?;
            let id = outbox
                .send_command(
                    &mut tx,
                    &QuoteRequest {
                        item: "pizza".into(),
                    },
                    Correlation::new().expect_from(expect).deadline_in(deadline),
                )
                .await?;
            tx.commit().await?;
            Res::Ok(id.to_string())
        }
    };
    let gathered = |id: String| {
        let orders = orders.clone();
        move || {
            let (orders, id) = (orders.clone(), id.clone());
            async move {
                Res::Ok(
                    sqlx::query_as::<_, (String, String, i64)>(
                        "SELECT responders, missing, timed_out FROM gathers WHERE correlation_id = ?",
                    )
                    .bind(id)
                    .fetch_optional(orders.pool())
                    .await?,
                )
            }
        }
    };
    let sent = Instant::now();
    let all = gather(vec!["kitchen-a", "kitchen-b"], LIMIT).await?;
    let partial = gather(
        vec!["kitchen-a", "kitchen-b", "kitchen-c"],
        Duration::from_secs(4),
    )
    .await?;
    let (who, missing, timed_out) = wait_for("complete gather", LIMIT, gathered(all)).await?;
    assert_eq!(
        (who.as_str(), missing.as_str(), timed_out),
        ("kitchen-a=105,kitchen-b=105", "", 0)
    );
    assert!(sent.elapsed() < LIMIT);
    let (who, missing, timed_out) = wait_for("partial gather", LIMIT, gathered(partial)).await?;
    assert_eq!(
        (who.as_str(), missing.as_str(), timed_out),
        ("kitchen-a=105,kitchen-b=105", "kitchen-c", 1)
    );

    // 6. request().await from another instance (this process): the order-service process
    //    records the reply, this one reads it from the shared database.
    let requester = Dispatcher::new(orders.clone(), GroupName::new("order-service")?)
        .replies_to(ChannelName::new(REPLIES)?)
        .requester()?;
    match requester
        .request(
            &ValidateConsumer {
                consumer_id: "c-5".into(),
            },
            LIMIT,
        )
        .await?
    {
        Outcome::Replied(v) => assert_eq!(v.consumer_id, "c-5"),
        other => return Err(format!("request: expected a reply, got {other:?}").into()),
    }

    // 7. Bad input. A reply nobody asked for → dead letter naming it.
    let stray = Codec::encode_to(&Rejection::new("?"), &ChannelName::new(REPLIES)?)?;
    let mut stray = stray.with_key("x")?;
    stray.headers.insert(headers::MESSAGE_KIND, "reply")?;
    stray
        .headers
        .insert(headers::CORRELATION_ID, "no-such-command")?;
    let stray_id = stray.id.to_string();
    broker.publish(&[stray]).await?;
    let (reason, error) = wait_for("stray reply dead letter", LIMIT, || {
        dead_letter(&orders, &stray_id)
    })
    .await?;
    assert_eq!(reason, "permanent");
    assert!(
        error.contains(&stray_id) && error.contains("matches no command"),
        "{error}"
    );

    //    A reply of the wrong type for a pending command → dead letter; the command stays
    //    pending.
    let pending_id = "pending-command-1";
    let mut tx = orders.begin().await?;
    orders
        .correlation_insert(
            &mut tx,
            &[NewCorrelation {
                correlation_id: pending_id.into(),
                command_type: "consumer.ValidateConsumer".into(),
                channel: "consumer-service.commands".into(),
                data: "null".into(),
                deadline_ms: None,
                expected: vec![],
                expected_count: 1,
                gather: false,
                created_at_ms: now_ms(),
            }],
        )
        .await?;
    orders.commit(tx).await?;
    let mut wrong = Codec::encode_to(
        &Quote {
            kitchen: "k".into(),
            cents: 1,
        },
        &ChannelName::new(REPLIES)?,
    )?
    .with_key("y")?;
    wrong.headers.insert(headers::MESSAGE_KIND, "reply")?;
    wrong.headers.insert(headers::REPLY_OUTCOME, "success")?;
    wrong.headers.insert(headers::CORRELATION_ID, pending_id)?;
    let wrong_id = wrong.id.to_string();
    broker.publish(&[wrong]).await?;
    let (reason, error) = wait_for("wrong-type reply dead letter", LIMIT, || {
        dead_letter(&orders, &wrong_id)
    })
    .await?;
    assert_eq!(reason, "permanent");
    assert!(
        error.contains(&wrong_id) && error.contains("kitchen.Quote"),
        "{error}"
    );
    let rec = orders
        .correlation_get(pending_id)
        .await?
        .ok_or("row gone")?;
    assert_eq!(rec.state, courier_core::CorrelationState::Pending);

    //    A command the receiver has no handler for → its dead letter, type named.
    let mut tx = orders.begin().await?;
    let audit = outbox
        .send_command(
            &mut tx,
            &AuditConsumer {
                consumer_id: "c-6".into(),
            },
            Correlation::new(),
        )
        .await?
        .to_string();
    tx.commit().await?;
    let (reason, error) = wait_for("unhandled command dead letter", LIMIT, || {
        dead_letter(&consumers_db, &audit)
    })
    .await?;
    assert_eq!(reason, "unknown-type");
    assert!(error.contains("consumer.AuditConsumer"), "{error}");

    // 8. The reply reaches a restarted instance: kill -9 the order service, send (this
    //    process relays), the consumer service answers while the sender is down, a new
    //    instance handles the reply from the correlation row in the database.
    sender.kill()?;
    let while_down = send(
        ValidateConsumer {
            consumer_id: "c-7".into(),
        },
        Correlation::new(),
    )
    .await?;
    let executed = |id: String| {
        let db = consumers_db.clone();
        move || {
            let (db, id) = (db.clone(), id.clone());
            async move {
                Res::Ok(
                    sqlx::query_scalar::<_, String>(
                        "SELECT consumer_id FROM executed WHERE correlation_id = ?",
                    )
                    .bind(id)
                    .fetch_optional(db.pool())
                    .await?,
                )
            }
        }
    };
    wait_for(
        "c-7 executed while the sender is down",
        LIMIT,
        executed(while_down.clone()),
    )
    .await?;
    assert!(outcome(&orders, &while_down).await?.is_none());
    sender.restart()?;
    let (o, _, _) = wait_for("the reply to c-7 in the restarted sender", LIMIT, || {
        outcome(&orders, &while_down)
    })
    .await?;
    assert_eq!(o, "replied:c-7");

    // 9. Deadline: the consumer service is down; the command times out for the sender
    //    (durable timer), and when the consumer service comes back it does not execute
    //    the expired command (dead letter "expired").
    consumer.kill()?;
    let late = send(
        ValidateConsumer {
            consumer_id: "c-8".into(),
        },
        Correlation::new().deadline_in(Duration::from_millis(1500)),
    )
    .await?;
    let (o, _, responder) =
        wait_for("the timeout of c-8", LIMIT, || outcome(&orders, &late)).await?;
    assert_eq!((o.as_str(), responder), ("timed-out", None));
    consumer.restart()?;
    let (reason, _) = wait_for("the expired c-8 dead letter", LIMIT, || {
        dead_letter(&consumers_db, &late)
    })
    .await?;
    assert_eq!(reason, "expired");
    assert!(
        executed(late.clone())().await?.is_none(),
        "an expired command was executed"
    );

    relay.abort();
    Ok(())
}
