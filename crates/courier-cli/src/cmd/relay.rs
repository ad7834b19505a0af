//! `courier relay`: a service database's outbox relay as its own process.

use super::common::{self, Access};
use anyhow::{Context, Result};
use courier::core::{OutboxSource, Publisher, Relay, RelayConfig};
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

Examples:
  courier relay --db sqlite:orders.db --broker sqlite:broker.db
  courier relay --db postgres://app:secret@127.0.0.1/orders --broker nats://127.0.0.1:4222
  RUST_LOG=debug courier relay --db sqlite:orders.db --lease-ms 5000"
)]
pub(crate) struct Args {
    /// The service database whose outbox is relayed: sqlite:PATH or postgres://user@host/db
    #[arg(long, env = "COURIER_DB", value_name = "URL")]
    db: String,

    /// The broker to publish to: sqlite:PATH or nats://host:port
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
}

pub(crate) async fn run(args: Args) -> Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Fails only if a subscriber is already set, which is harmless.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();

    let (publisher, broker) = common::open_publisher(&args.broker, Access::Create).await?;
    let mut config = RelayConfig::default()
        .lease_ttl(Duration::from_millis(args.lease_ms))
        .batch_size(args.batch_size);
    if let Some(name) = args.instance {
        config = config.instance(name);
    }
    match common::open_service_db(&args.db).await? {
        common::ServiceDb::Sqlite(store) => relay(store, publisher, &broker, config).await,
        common::ServiceDb::Postgres(store) => relay(store, publisher, &broker, config).await,
    }
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
