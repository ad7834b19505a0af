//! `courier relay`: a service database's outbox relay as its own process.

use super::common::{self, Access};
use anyhow::{Context, Result, bail};
use courier::core::{OutboxSource, Publisher, Relay, RelayConfig};
use courier::postgres::{PgLogTailing, PgStore};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// Run the outbox relay of a service database as its own process.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Run the outbox relay of a service database as its own process: it \
publishes committed outbox rows to the broker in order, and deletes each row only after the \
broker confirmed it (at least once). Several relays may run for one outbox: one holds a \
lease and publishes, the others stand by and take over within --lease-ms if it dies.

Services in any language can use Courier by inserting rows into the outbox table of their \
database, in the same transaction as their business change:

  courier_outbox(
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,  -- commit order; leave it out
    message_id TEXT,     -- a UUID (preferably v7), kept by duplicates
    channel    TEXT,     -- the destination channel
    headers    TEXT,     -- JSON object of strings; must include \"destination\" (the channel),
                         -- e.g. {\"destination\":\"orders\",\"partition-key\":\"order-1\",\"type\":\"order.OrderPlaced\"}
    payload    BLOB,     -- the message body
    created_at INTEGER)  -- milliseconds since the Unix epoch

Logs go to stderr (RUST_LOG sets the filter; default info), including a line when this \
relay becomes active. Stops cleanly on Ctrl-C (SIGINT) or SIGTERM.

Two ways to read the outbox (--relay):
  polling      (default; SQLite and PostgreSQL) selects the oldest rows, publishes them,
               deletes them; woken at once by LISTEN/NOTIFY (PostgreSQL) or a local signal
               (SQLite), and polls as a fallback.
  log-tailing  (PostgreSQL only) reads the outbox's inserts from the write-ahead log
               through a logical replication slot, in commit order, without polling
               queries on the table; published rows are deleted and the slot advanced.
               Needs wal_level = logical on the server (postgresql.conf, then a restart),
               a free replication slot (max_replication_slots) and a role that may create
               slots and publications. The slot and a publication of the same name are
               created on first start: --slot NAME, default courier_<schema>_<hash>
               (printed at start); rows already in the outbox then are relayed from the
               table once, first. The slot keeps every WAL segment after its position:
               while no log-tailing relay runs, the server's WAL grows with every write
               (see docs/operations.md). When you stop using log tailing, drop both with
                 courier relay --relay log-tailing --db URL --drop-slot [--slot NAME]
               (or SELECT pg_drop_replication_slot('NAME'); DROP PUBLICATION NAME).
  Both share the outbox lease, so never two active relays; both deliver at least once
  (a crash repeats messages with the same id, never loses one).

Examples:
  courier relay --db sqlite:orders.db --broker sqlite:broker.db
  courier relay --db postgres://app:secret@127.0.0.1/orders --broker nats://127.0.0.1:4222
  courier relay --relay log-tailing --db postgres://app@127.0.0.1/orders --broker nats://127.0.0.1:4222
  RUST_LOG=debug courier relay --db sqlite:orders.db --lease-ms 5000"
)]
pub(crate) struct Args {
    /// The service database whose outbox is relayed: sqlite:PATH or postgres://user@host/db
    #[arg(long, env = "COURIER_DB", value_name = "URL")]
    db: String,

    /// The broker to publish to: sqlite:PATH, nats://host:port, amqp://user:password@host:port/vhost or postgres://user@host/db
    #[arg(long, env = "COURIER_BROKER", default_value = common::DEFAULT_BROKER, value_name = "URL")]
    broker: String,

    /// How long the relay lease lasts without renewal; a standby takes over after this
    #[arg(long, value_name = "MS", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(100..))]
    lease_ms: u64,

    /// Most outbox rows per published batch
    #[arg(long, value_name = "N", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,

    /// A name for this relay instance in logs and in the lease (default: a fresh id)
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,

    /// How the outbox is read: polling (select, publish, delete) or log-tailing
    /// (PostgreSQL's write-ahead log through a logical replication slot)
    #[arg(
        long = "relay",
        value_enum,
        default_value = "polling",
        value_name = "HOW"
    )]
    how: How,

    /// log-tailing: the replication slot (and publication) name; default
    /// courier_<schema>_<hash>
    #[arg(long, value_name = "NAME")]
    slot: Option<String>,

    /// log-tailing: drop the replication slot and its publication, then exit (frees the
    /// WAL the slot holds; stop the log-tailing relays first)
    #[arg(long)]
    drop_slot: bool,
}

/// How `courier relay` reads the outbox.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// Select the oldest rows, publish, delete (woken by LISTEN/NOTIFY or a local signal).
    Polling,
    /// Tail PostgreSQL's write-ahead log through a logical replication slot.
    LogTailing,
}

pub(crate) async fn run(args: Args) -> Result<()> {
    // lapin logs each message RabbitMQ returns and each refused lock probe, and
    // pgwire-replication logs an error whenever a replication stream ends (also on a
    // take-over); Courier's transports and the log-tailing source report what matters.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=off,pgwire_replication=off"));
    // Fails only if a subscriber is already set, which is harmless.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();

    if args.how == How::Polling && (args.slot.is_some() || args.drop_slot) {
        bail!("--slot and --drop-slot belong to --relay log-tailing");
    }
    if args.how == How::LogTailing && !is_postgres_url(&args.db) {
        bail!(
            "--relay log-tailing needs a PostgreSQL service database (--db postgres://...), \
             not {}: only PostgreSQL has logical decoding; use the default --relay polling",
            courier::postgres::redact_url(&args.db)
        );
    }
    let db = common::open_service_db(&args.db).await?;
    if args.drop_slot
        && let common::ServiceDb::Postgres(store) = &db
    {
        return drop_slot(store, args.slot.as_deref()).await;
    }

    let (publisher, broker) = common::open_publisher(&args.broker, Access::Create).await?;
    let mut config = RelayConfig::default()
        .lease_ttl(Duration::from_millis(args.lease_ms))
        .batch_size(args.batch_size);
    if let Some(name) = args.instance {
        config = config.instance(name);
    }
    match (db, args.how) {
        (common::ServiceDb::Sqlite(store), _) => relay(store, publisher, &broker, config).await,
        (common::ServiceDb::Postgres(store), How::Polling) => {
            relay(store, publisher, &broker, config).await
        }
        (common::ServiceDb::Postgres(store), How::LogTailing) => {
            let shown = courier::core::OutboxSource::describe(&store);
            let source = match &args.slot {
                Some(slot) => PgLogTailing::with_slot(store, slot).await,
                None => PgLogTailing::new(store).await,
            }
            .with_context(|| format!("cannot set up log tailing on {shown}"))?;
            tracing::info!(
                slot = %source.slot_name(),
                "log tailing through replication slot {0} (drop it when no longer used: \
                 courier relay --relay log-tailing --db URL --drop-slot --slot {0})",
                source.slot_name()
            );
            relay(source, publisher, &broker, config).await
        }
    }
}

/// Whether `url` names a PostgreSQL database (`postgres://` or `postgresql://`).
fn is_postgres_url(url: &str) -> bool {
    let lower = url.trim_start().to_ascii_lowercase();
    lower.starts_with("postgres://") || lower.starts_with("postgresql://")
}

/// `--drop-slot`: drop the log-tailing slot and publication of `store`.
async fn drop_slot(store: &PgStore, slot: Option<&str>) -> Result<()> {
    let name = match slot {
        Some(s) => s.to_owned(),
        None => PgLogTailing::default_slot_name(store).await?,
    };
    if PgLogTailing::drop_slot_named(store, &name).await? {
        println!("dropped replication slot {name} and its publication");
    } else {
        println!("no replication slot {name}; nothing to drop");
    }
    Ok(())
}

/// Run the relay of `store` until a signal.
async fn relay<S: OutboxSource>(
    store: S,
    publisher: Arc<dyn Publisher>,
    broker: &str,
    config: RelayConfig,
) -> Result<()> {
    let db = store.describe();
    tracing::info!(
        db = %db,
        broker = %broker,
        relay = %config.instance,
        "relay started; it publishes while it holds the outbox lease (Ctrl-C to stop)"
    );
    let relay = Relay::new(store, publisher).with_config(config);
    let stats = relay.stats();
    relay
        .run(shutdown())
        .await
        .with_context(|| format!("the relay of {db} stopped with an error"))?;
    tracing::info!(
        published = stats.published.load(Ordering::Relaxed),
        "relay stopped"
    );
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; stop with Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
