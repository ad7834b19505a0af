//! `courier bench`: the end-to-end benchmark, on the embedded default or any backend.
//!
//! Producer tasks commit a business row plus one outbox message per transaction; the
//! relay moves them to the broker; a consumer group member in a SEPARATE OS process
//! (this binary, `bench --internal-consumer`) handles each message with the inbox,
//! writing an effect row. `lost` and `duplicates_applied` are counted from the
//! consumer's database; latency is commit → handler, measured by the handler.

mod side;

use crate::cmd::broker::{Broker, scheme};
use crate::cmd::common::Access;
use anyhow::{Context, Result, bail};
use courier::core::{OutboxSource, Relay};
use courier::postgres::{PgLogTailing, PgStore};
use courier::sqlite::{SqliteBroker, SqliteBrokerConfig, Sync};
use courier::{
    ChannelName, Codec, Contract, Dispatcher, DispatcherConfig, GroupName, HandlerContext,
    MessageKind, SubscribeOptions,
};
use serde::{Deserialize, Serialize};
use side::{BenchStore, DbSpec, Side};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// The bench channel on the embedded broker (its file is the bench's own).
pub(crate) const CHANNEL: &str = "bench";
pub(crate) const GROUP: &str = "bench-consumer";
/// How long each raw reference is measured.
const RAW_DURATION: Duration = Duration::from_secs(1);

/// Durability setting for every database of the run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SyncArg {
    /// WAL + synchronous=NORMAL: survives process crashes (Courier's default).
    Normal,
    /// WAL + synchronous=FULL: every commit fsync'd.
    Full,
}

impl SyncArg {
    fn sync(self) -> Sync {
        match self {
            Self::Normal => Sync::Normal,
            Self::Full => Sync::Full,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Full => "full",
        }
    }
}

/// How the bench's relay reads the outbox.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RelayKind {
    /// Select the oldest rows, publish, delete (woken by a signal or LISTEN/NOTIFY).
    Polling,
    /// PostgreSQL only: tail the write-ahead log through a logical replication slot.
    LogTailing,
}

impl RelayKind {
    fn name(self) -> &'static str {
        match self {
            Self::Polling => "polling",
            Self::LogTailing => "log-tailing",
        }
    }
}

/// Arguments of `courier bench`.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "End-to-end benchmark: outbox -> relay -> broker -> consumer group with \
inbox. By default everything is the embedded default (SQLite service databases and the \
embedded SQLite broker, in a temporary directory); --db and --broker run the same bench on \
PostgreSQL, NATS JetStream, ...

Producer tasks each commit a business row plus one outbox message per transaction; the \
relay publishes them to the broker; a consumer group member in a separate OS process \
handles each message with the inbox and records an effect. Reports end-to-end \
throughput, commit -> handler latency (p50/p99/max), and, measured in the same run, the \
raw limits of the backends without Courier:
  raw_commit_rate_per_s   single-row commits of the service database as an application \
commits a row: BEGIN; INSERT; COMMIT per row (SQLite: one held connection, same driver and \
--sync; PostgreSQL: from as many connections as --producers). Compare like with like: a \
producer commits a transaction too. Also one autocommit INSERT per row the same way \
(raw_autocommit_rate_per_s, one round trip instead of three) and on SQLite autocommit \
through a pool (raw_commit_rate_pool_per_s); see BENCHMARKS.md.
  producer_commit_rate_per_s  the producers' own transactions per second in this run \
(business row + outbox message), from the first to the last commit.
  raw_publish_rate_per_s  confirmed publishes of the broker's own client (NATS: JetStream \
publishes with 256 acks in flight; RabbitMQ: persistent publishes to a stream with 256 \
confirms in flight; PostgreSQL: single-row INSERT commits; embedded broker: \
single-row commits on a file beside it). On NATS also \
raw_publish_with_headers_rate_per_s: the same publishes carrying a bench message's \
headers and a Nats-Msg-Id each, what the relay sends.
Then the relay alone (relay_only_msgs_per_s): --relay-messages outbox rows committed \
first, published by a fresh relay, timed until the last one is confirmed.
`lost` and `duplicates_applied` are counted from the consumer's database; the exit code \
is non-zero unless both are 0. On PostgreSQL the bench uses (and drops afterwards) the \
schemas courier_bench_producer, courier_bench_consumer and courier_bench_broker; on NATS a \
stream for a fresh channel bench-<id>, on RabbitMQ its streams, deleted afterwards.

Examples:
  courier bench --messages 20000
  courier bench --messages 5000 --rate 1000 --json     # steady load, latency focus
  courier bench --db postgres://postgres@127.0.0.1/test --broker nats://127.0.0.1:4222 --json
  courier bench --db postgres://postgres@127.0.0.1/test --broker amqp://guest:guest@127.0.0.1:5672/%2f
  courier bench --db postgres://postgres@127.0.0.1/test --relay log-tailing --rate 200   # WAL tailing"
)]
pub(crate) struct BenchArgs {
    /// Service databases: sqlite (files in --dir, the default) or postgres://USER@HOST/DB
    #[arg(long, value_name = "URL")]
    pub(crate) db: Option<String>,
    /// Broker: sqlite:PATH (default: broker.db in --dir), nats://HOST:PORT,
    /// amqp://USER:PASSWORD@HOST:PORT/VHOST or postgres://USER@HOST/DB
    #[arg(long, value_name = "URL")]
    pub(crate) broker: Option<String>,
    /// Messages to send end to end
    #[arg(long, default_value_t = 20_000)]
    pub(crate) messages: u64,
    /// Offer a steady load of R messages/s instead of as fast as possible
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// Producer tasks (each commits business row + outbox message per transaction)
    #[arg(long, default_value_t = 4)]
    pub(crate) producers: u32,
    /// Partitions of the bench channel
    #[arg(long, default_value_t = 4)]
    pub(crate) partitions: u32,
    /// Distinct partition keys
    #[arg(long, default_value_t = 1000)]
    pub(crate) keys: u64,
    /// Approximate payload size in bytes
    #[arg(long, default_value_t = 200)]
    pub(crate) payload_bytes: usize,
    /// On PostgreSQL, the bench's schemas are PREFIX_producer, PREFIX_consumer and
    /// PREFIX_broker (dropped and recreated at the start, dropped at the end)
    #[arg(long, value_name = "PREFIX", default_value = "courier_bench",
          value_parser = parse_schema_prefix)]
    pub(crate) schema_prefix: String,
    /// Durability of every SQLite database in the run (PostgreSQL uses its server's
    /// synchronous_commit)
    #[arg(long, value_enum, default_value = "normal")]
    pub(crate) sync: SyncArg,
    /// Keep the databases in DIR (default: a temporary directory, removed afterwards)
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<PathBuf>,
    /// How the relay reads the outbox: polling, or log-tailing (PostgreSQL --db only; a
    /// replication slot is created for the run and dropped afterwards)
    #[arg(long, value_enum, default_value = "polling", value_name = "HOW")]
    pub(crate) relay: RelayKind,
    /// Then measure the relay alone: commit this many outbox messages first, and time
    /// the relay publishing them to the broker (0 skips it)
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub(crate) relay_messages: u64,
    /// Give up (and report what was lost) after this many seconds
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_secs: u64,
    /// Run as the consumer process (used by the bench itself)
    #[arg(long, hide = true)]
    pub(crate) internal_consumer: bool,
    /// The bench process the consumer belongs to (used by the bench itself)
    #[arg(long, hide = true)]
    pub(crate) parent_pid: Option<u32>,
    /// The channel the consumer reads (used by the bench itself)
    #[arg(long, hide = true)]
    pub(crate) internal_channel: Option<String>,
}

impl BenchArgs {
    /// The PostgreSQL schema of the broker's tables.
    fn broker_schema(&self) -> String {
        format!("{}_broker", self.schema_prefix)
    }
}

/// A schema prefix is spliced into SQL: plain identifiers only.
fn parse_schema_prefix(s: &str) -> std::result::Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 40
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a plain schema name prefix: use 1-40 lower-case letters, digits and '_', \
             starting with a letter or '_'"
        ))
    }
}

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct Ping {
    n: u64,
    ts_us: u64,
    pad: String,
}

impl Contract for Ping {
    const TYPE: &'static str = "bench.Ping";
    const KIND: MessageKind = MessageKind::Event;
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The report: the first keys are the contract of `--json`.
#[derive(Serialize, Debug)]
struct Report {
    messages: u64,
    seconds: f64,
    throughput_msgs_per_s: f64,
    raw_commit_rate_per_s: f64,
    latency_ms: Latency,
    lost: u64,
    duplicates_applied: u64,
    raw_publish_rate_per_s: f64,
    throughput_vs_raw: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_commit_rate_pool_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_autocommit_rate_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    throughput_vs_raw_autocommit: Option<f64>,
    producer_commit_rate_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    relay_only_msgs_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    relay_only_vs_raw_publish: Option<f64>,
    /// NATS: the raw publish rate of messages with Courier's headers and a
    /// `Nats-Msg-Id` each (the like-with-like reference of the relay).
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_publish_with_headers_rate_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    relay_only_vs_raw_publish_with_headers: Option<f64>,
    db: String,
    broker: String,
    relay: &'static str,
    producers: u32,
    partitions: u32,
    rate: Option<f64>,
    sync: &'static str,
    payload_bytes: usize,
}

#[derive(Serialize, Debug)]
struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
}

/// The raw references of the service database, commits per second.
struct RawDb {
    /// `BEGIN; INSERT; COMMIT` per row: the reference (`raw_commit_rate_per_s`).
    transaction: f64,
    /// One autocommit `INSERT` per row.
    autocommit: f64,
    /// SQLite only: autocommit through a sqlx pool.
    pool: Option<f64>,
}

/// What the producer and the consumer process share: where the databases and the broker
/// are, and the channel.
struct Setup {
    db: DbSpec,
    /// The broker URL as both processes open it.
    broker_url: String,
    channel: ChannelName,
    dir: PathBuf,
    sync: Sync,
}

impl Setup {
    /// Resolve `--db`, `--broker` and the channel for a run in `dir`.
    fn new(args: &BenchArgs, dir: &Path) -> Result<Self> {
        let sync = args.sync.sync();
        let db = match args.db.as_deref() {
            None => DbSpec::Sqlite {
                dir: dir.to_path_buf(),
                sync,
            },
            Some(url) => match scheme(url).as_str() {
                "sqlite" => DbSpec::Sqlite {
                    dir: dir.to_path_buf(),
                    sync,
                },
                "postgres" | "postgresql" => DbSpec::Postgres {
                    url: url.to_owned(),
                    prefix: args.schema_prefix.clone(),
                },
                _ => bail!(
                    "--db {url}: expected sqlite (files in --dir) or postgres://USER@HOST/DATABASE"
                ),
            },
        };
        let broker_url = match args.broker.as_deref() {
            None => format!("sqlite:{}", dir.join("broker.db").display()),
            // The consumer process gets the URL below, with the schema already in it.
            Some(url) if scheme(url).starts_with("postgres") && !args.internal_consumer => {
                side::pg_url_in_schema(url, &args.broker_schema())
            }
            Some(url) => url.to_owned(),
        };
        let channel = match (&args.internal_channel, scheme(&broker_url).as_str()) {
            (Some(c), _) => ChannelName::new(c.as_str())?,
            (None, "sqlite") => ChannelName::new(CHANNEL)?,
            // A shared server: a fresh channel per run, deleted afterwards.
            (None, _) => ChannelName::new(format!(
                "bench-{}",
                &uuid::Uuid::now_v7().simple().to_string()[20..]
            ))?,
        };
        Ok(Self {
            db,
            broker_url,
            channel,
            dir: dir.to_path_buf(),
            sync,
        })
    }

    /// Open the broker (the embedded one with the run's durability setting).
    async fn broker(&self) -> Result<Broker> {
        match scheme(&self.broker_url).as_str() {
            "sqlite" => {
                let path = crate::cmd::common::sqlite_path("--broker", &self.broker_url)?;
                Ok(Broker::Sqlite(
                    SqliteBroker::open_with(&path, SqliteBrokerConfig::default().sync(self.sync))
                        .await
                        .with_context(|| format!("cannot open broker {}", path.display()))?,
                ))
            }
            _ => Broker::open(&self.broker_url, Access::Create).await,
        }
    }

    /// The raw limits of the service database: single-row commits per second as an
    /// explicit transaction (the reference), as one autocommit statement, and on SQLite
    /// autocommit through a pool. On PostgreSQL, `clients` connections commit at once (as
    /// many as the bench's producers); SQLite serialises writers, so one connection is
    /// its limit.
    async fn raw_db(&self, clients: usize, payload_bytes: usize) -> Result<RawDb> {
        match &self.db {
            DbSpec::Sqlite { .. } => {
                let measure = async |file: &str, via| {
                    raw_sqlite(&self.dir.join(file), self.sync, via, payload_bytes).await
                };
                use courier::sqlite::RawPath;
                Ok(RawDb {
                    transaction: measure("raw-tx.db", RawPath::Transaction).await?,
                    autocommit: measure("raw.db", RawPath::Connection).await?,
                    pool: Some(measure("raw-pool.db", RawPath::Pool).await?),
                })
            }
            DbSpec::Postgres { .. } => {
                let url = self.db.pg_url(Side::Producer).unwrap_or_default();
                let measure = async |explicit_tx| {
                    courier::postgres::raw_commit_rate(
                        &url,
                        clients,
                        explicit_tx,
                        payload_bytes,
                        RAW_DURATION,
                        1 << 30,
                    )
                    .await
                    .context("measuring the raw PostgreSQL commit rate")
                };
                Ok(RawDb {
                    transaction: measure(true).await?,
                    autocommit: measure(false).await?,
                    pool: None,
                })
            }
        }
    }

    /// NATS only: the raw publish rate of messages like the bench's, with Courier's
    /// headers and a `Nats-Msg-Id` each.
    async fn raw_broker_with_headers(&self, args: &BenchArgs) -> Result<Option<f64>> {
        if scheme(&self.broker_url) != "nats" {
            return Ok(None);
        }
        let ping = Ping {
            n: 0,
            ts_us: now_us(),
            pad: "x".repeat(args.payload_bytes.saturating_sub(40)),
        };
        let sample = Codec::encode_to(&ping, &self.channel)?.with_key("key-0")?;
        courier::nats::raw_publish_rate_with_headers(
            &self.broker_url,
            &sample,
            RAW_DURATION,
            1 << 30,
        )
        .await
        .context("measuring the raw JetStream publish rate with Courier's headers")
        .map(Some)
    }

    /// The raw limit of the broker: confirmed publishes per second of its own client.
    async fn raw_broker(&self, payload_bytes: usize) -> Result<f64> {
        match scheme(&self.broker_url).as_str() {
            "sqlite" => {
                raw_sqlite(
                    &self.dir.join("raw-broker.db"),
                    self.sync,
                    courier::sqlite::RawPath::Connection,
                    payload_bytes,
                )
                .await
            }
            "nats" => courier::nats::raw_publish_rate(
                &self.broker_url,
                payload_bytes,
                RAW_DURATION,
                1 << 30,
            )
            .await
            .context("measuring the raw JetStream publish rate"),
            "amqp" => courier::amqp::raw_publish_rate(
                &self.broker_url,
                payload_bytes,
                RAW_DURATION,
                1 << 30,
            )
            .await
            .context("measuring the raw RabbitMQ confirm rate"),
            "postgres" | "postgresql" => courier::postgres::raw_commit_rate(
                &self.broker_url,
                1,
                false,
                payload_bytes,
                RAW_DURATION,
                1 << 30,
            )
            .await
            .context("measuring the raw PostgreSQL commit rate of the broker"),
            other => bail!("--broker: no raw reference for {other}: brokers"),
        }
    }
}

async fn raw_sqlite(
    path: &Path,
    sync: Sync,
    via: courier::sqlite::RawPath,
    payload_bytes: usize,
) -> Result<f64> {
    courier::sqlite::raw_commit_rate(path, sync, via, payload_bytes, RAW_DURATION, 1_000_000)
        .await
        .with_context(|| format!("measuring the raw SQLite commit rate ({via:?})"))
}

/// Run the bench (or, with `--internal-consumer`, its consumer process).
pub(crate) async fn run(args: BenchArgs, json: bool) -> Result<()> {
    // Warnings (a server unreachable, retries) go to stderr, in both processes.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,lapin=off,pgwire_replication=off")
    });
    // Fails only if a subscriber is already set, which is harmless.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    if args.internal_consumer {
        return consumer(args).await;
    }
    if args.messages == 0 {
        bail!("--messages must be at least 1");
    }
    if args.producers == 0 {
        bail!("--producers must be at least 1");
    }
    if let Some(r) = args.rate
        && !(r > 0.0 && r.is_finite())
    {
        bail!("--rate must be a positive number of messages per second, got {r}");
    }
    let temp;
    let dir: PathBuf = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            for f in [
                "producer.db",
                "consumer.db",
                "broker.db",
                "raw.db",
                "raw-pool.db",
                "raw-tx.db",
                "raw-broker.db",
            ] {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(d.join(format!("{f}{suffix}")));
                }
            }
            d.clone()
        }
        None => {
            temp = tempfile::tempdir().context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let setup = Setup::new(&args, &dir)?;
    setup.db.reset().await?;
    if scheme(&setup.broker_url).starts_with("postgres") {
        side::pg_reset_schema(&setup.broker_url, &args.broker_schema()).await?;
    }
    let outcome = match &setup.db {
        DbSpec::Sqlite { .. } => {
            if args.relay == RelayKind::LogTailing {
                bail!(
                    "--relay log-tailing needs --db postgres://... (only PostgreSQL has \
                     logical decoding); SQLite relays by polling"
                );
            }
            let store = setup
                .db
                .open_sqlite(Side::Producer)
                .await?
                .context("the producer database")?;
            run_on(store.clone(), store, &setup, &args, json).await
        }
        DbSpec::Postgres { .. } => {
            let store = setup
                .db
                .open_pg(Side::Producer)
                .await?
                .context("the producer database")?;
            match args.relay {
                RelayKind::Polling => run_on(store.clone(), store, &setup, &args, json).await,
                RelayKind::LogTailing => {
                    // A slot left by an interrupted run points into a dropped schema.
                    let slot = PgLogTailing::default_slot_name(&store).await?;
                    PgLogTailing::drop_slot_named(&store, &slot).await?;
                    let source = PgLogTailing::new(store.clone())
                        .await
                        .context("setting up log tailing (needs wal_level = logical)")?;
                    let outcome = run_on(store, source.clone(), &setup, &args, json).await;
                    if let Err(e) = source.drop_slot().await {
                        eprintln!("bench: could not drop the replication slot {slot}: {e}");
                    }
                    outcome
                }
            }
        }
    };
    setup.db.cleanup().await;
    if scheme(&setup.broker_url).starts_with("postgres") {
        side::pg_drop_schema(&setup.broker_url, &args.broker_schema()).await;
    }
    let report = outcome?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_human(&report);
    }
    if report.lost > 0 || report.duplicates_applied > 0 {
        bail!(
            "{} message(s) lost and {} applied twice: this is a bug, please report it",
            report.lost,
            report.duplicates_applied
        );
    }
    Ok(())
}

/// The relay alone: `--relay-messages` rows committed to the outbox first, then a relay
/// started and timed until it published them all. Messages per second.
async fn relay_only<S: BenchStore, R: OutboxSource>(
    store: S,
    source: R,
    broker: &Broker,
    setup: &Setup,
    args: &BenchArgs,
) -> Result<f64> {
    let channel = ChannelName::new(format!("{}-relay", setup.channel))?;
    broker
        .create_channel(&channel, args.partitions)
        .await
        .with_context(|| format!("creating the relay bench channel {channel}"))?;
    let total = args.relay_messages;
    let pad = "x".repeat(args.payload_bytes.saturating_sub(40));
    let mut batch = Vec::with_capacity(500);
    for n in 0..total {
        let ping = Ping {
            n,
            ts_us: now_us(),
            pad: pad.clone(),
        };
        batch.push(
            Codec::encode_to(&ping, &channel)?.with_key(format!("key-{}", n % args.keys.max(1)))?,
        );
        if batch.len() == 500 || n + 1 == total {
            store.fill_outbox(&batch).await?;
            batch.clear();
        }
    }
    let relay = Relay::new(source, broker.publisher());
    let stats = relay.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    let deadline = started + Duration::from_secs(args.timeout_secs);
    while stats.published.load(Ordering::Relaxed) < total {
        if Instant::now() > deadline || running.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let published = stats.published.load(Ordering::Relaxed);
    let _ = stop.send(());
    running.await??;
    if let Err(e) = broker.delete_channel(&channel).await {
        eprintln!("bench: could not delete the relay bench channel {channel}: {e}");
    }
    if published < total {
        bail!("the relay published only {published} of {total} messages within --timeout-secs");
    }
    Ok(total as f64 / seconds.max(1e-9))
}

/// The run itself, with the producer's service database `store` and its outbox read
/// through `source` (the store itself when polling).
async fn run_on<S: BenchStore, R: OutboxSource>(
    store: S,
    source: R,
    setup: &Setup,
    args: &BenchArgs,
    json: bool,
) -> Result<Report> {
    // 1. The raw references, on a quiet machine.
    let raw_db = setup
        .raw_db(args.producers as usize, args.payload_bytes)
        .await?;
    let raw = raw_db.transaction;
    let raw_publish = setup.raw_broker(args.payload_bytes).await?;
    let raw_publish_headers = setup.raw_broker_with_headers(args).await?;

    // 2. The broker with the channel.
    let broker = setup.broker().await?;
    let channel = setup.channel.clone();
    broker
        .create_channel(&channel, args.partitions)
        .await
        .with_context(|| format!("creating the bench channel {channel}"))?;
    let report = run_with_channel(
        store.clone(),
        source.clone(),
        &broker,
        setup,
        args,
        json,
        raw,
        raw_publish,
    )
    .await;
    if let Ok(group) = GroupName::new(GROUP)
        && let Err(e) = broker.delete_group(&channel, &group).await
    {
        eprintln!("bench: could not delete the consumer group {group} of {channel}: {e}");
    }
    if let Err(e) = broker.delete_channel(&channel).await {
        eprintln!("bench: could not delete the bench channel {channel}: {e}");
    }
    let mut report = report?;
    if args.relay_messages > 0 {
        let rate = relay_only(store, source, &broker, setup, args).await?;
        report.relay_only_msgs_per_s = Some(rate);
        report.relay_only_vs_raw_publish = Some(rate / report.raw_publish_rate_per_s);
        report.relay_only_vs_raw_publish_with_headers = raw_publish_headers.map(|r| rate / r);
    }
    report.raw_publish_with_headers_rate_per_s = raw_publish_headers;
    report.raw_commit_rate_pool_per_s = raw_db.pool;
    report.raw_autocommit_rate_per_s = Some(raw_db.autocommit);
    report.throughput_vs_raw_autocommit =
        Some(report.throughput_msgs_per_s / raw_db.autocommit.max(1e-9));
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn run_with_channel<S: BenchStore, R: OutboxSource>(
    store: S,
    source: R,
    broker: &Broker,
    setup: &Setup,
    args: &BenchArgs,
    json: bool,
    raw: f64,
    raw_publish: f64,
) -> Result<Report> {
    let channel = setup.channel.clone();

    // 3. The consumer, as its own OS process.
    let exe = std::env::current_exe().context("finding the courier binary")?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("bench")
        .arg("--internal-consumer")
        .arg("--dir")
        .arg(&setup.dir)
        .arg("--broker")
        .arg(&setup.broker_url)
        .arg("--internal-channel")
        .arg(channel.as_str())
        .arg("--messages")
        .arg(args.messages.to_string())
        .arg("--partitions")
        .arg(args.partitions.to_string())
        .arg("--sync")
        .arg(args.sync.name())
        .arg("--parent-pid")
        .arg(std::process::id().to_string());
    if let Some(db) = &args.db {
        command.arg("--db").arg(db);
    }
    command.arg("--schema-prefix").arg(&args.schema_prefix);
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the consumer process")?;
    let stdout = child.stdout.take().context("consumer stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the consumer process did not get ready within 30 s")??;
    if ready.as_deref() != Some("ready") {
        bail!("the consumer process failed to start (said {ready:?})");
    }

    // 4. Relay in this process, like a service would run it.
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(Relay::new(source, broker.publisher()).run(async move {
        let _ = relay_stopped.await;
    }));

    // 5. Producers.
    let progress = progress_bar(args.messages, json);
    let next = Arc::new(AtomicU64::new(0));
    let committed = Arc::new(AtomicU64::new(0));
    let start_us = now_us();
    // When the last producer transaction committed (for the producers' own rate).
    let last_commit_us = Arc::new(AtomicU64::new(start_us));
    let start = tokio::time::Instant::now();
    let pad = "x".repeat(args.payload_bytes.saturating_sub(40));
    let mut producers = Vec::new();
    // A producer that gave up ends the run now, not at --timeout-secs.
    let producer_failed = Arc::new(AtomicBool::new(false));
    for _ in 0..args.producers {
        let (store, channel, next, committed, pad, producer_failed, last_commit_us) = (
            store.clone(),
            channel.clone(),
            next.clone(),
            committed.clone(),
            pad.clone(),
            producer_failed.clone(),
            last_commit_us.clone(),
        );
        let (n_total, rate, keys) = (args.messages, args.rate, args.keys.max(1));
        let give_up = start + Duration::from_secs(args.timeout_secs);
        producers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= n_total {
                    return anyhow::Ok(());
                }
                if let Some(r) = rate {
                    tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / r)).await;
                }
                let ping = Ping {
                    n,
                    ts_us: now_us(),
                    pad: pad.clone(),
                };
                let msg =
                    Codec::encode_to(&ping, &channel)?.with_key(format!("key-{}", n % keys))?;
                if let Err(e) = produce_retrying(&store, n, &pad, msg, give_up).await {
                    producer_failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                committed.fetch_add(1, Ordering::Relaxed);
                last_commit_us.fetch_max(now_us(), Ordering::Relaxed);
            }
        }));
    }

    // 6. Wait for the consumer to finish, showing progress.
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut effects = None;
    let status = loop {
        tokio::select! {
            s = child.wait() => break Some(s?),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if effects.is_none() {
            effects = setup.db.effects().await.ok();
        }
        let handled = match &effects {
            Some(e) => e.handled().await,
            None => 0,
        };
        progress.set_position(handled.max(0) as u64);
        progress.set_message(format!("committed {}", committed.load(Ordering::Relaxed)));
        if Instant::now() > deadline || producer_failed.load(Ordering::Relaxed) {
            break None;
        }
    };
    for p in producers {
        p.await??;
    }
    let _ = stop_relay.send(());
    relay.await??;
    if status.is_none() {
        let _ = child.kill().await;
    }
    progress.finish_and_clear();
    if let Some(s) = &status
        && !s.success()
    {
        let mut err = String::new();
        let _ = lines.into_inner().read_to_string(&mut err).await;
        bail!("the consumer process failed ({s}) {err}");
    }

    // 7. Count from the consumer's database.
    let effects = match effects {
        Some(e) => e,
        None => setup.db.effects().await?,
    };
    let totals = effects.totals().await?;
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for l in totals.latencies_us {
        hist.saturating_record(l.max(1) as u64);
    }
    let seconds =
        (totals.last_us.unwrap_or(start_us as i64) as f64 - start_us as f64).max(1.0) / 1e6;
    let throughput = totals.distinct as f64 / seconds;
    let producing_s = (last_commit_us
        .load(Ordering::Relaxed)
        .saturating_sub(start_us) as f64
        / 1e6)
        .max(1e-6);
    let producer_commit_rate_per_s = committed.load(Ordering::Relaxed) as f64 / producing_s;
    Ok(Report {
        messages: args.messages,
        seconds,
        throughput_msgs_per_s: throughput,
        raw_commit_rate_per_s: raw,
        latency_ms: Latency {
            p50: hist.value_at_quantile(0.50) as f64 / 1000.0,
            p99: hist.value_at_quantile(0.99) as f64 / 1000.0,
            max: hist.max() as f64 / 1000.0,
        },
        lost: args.messages.saturating_sub(totals.distinct as u64),
        duplicates_applied: (totals.rows - totals.distinct) as u64,
        raw_publish_rate_per_s: raw_publish,
        throughput_vs_raw: throughput / raw,
        raw_commit_rate_pool_per_s: None,
        raw_autocommit_rate_per_s: None,
        throughput_vs_raw_autocommit: None,
        producer_commit_rate_per_s,
        relay_only_msgs_per_s: None,
        relay_only_vs_raw_publish: None,
        raw_publish_with_headers_rate_per_s: None,
        relay_only_vs_raw_publish_with_headers: None,
        db: setup.db.describe(),
        broker: broker.describe(),
        relay: args.relay.name(),
        producers: args.producers,
        partitions: args.partitions,
        rate: args.rate,
        sync: args.sync.name(),
        payload_bytes: args.payload_bytes,
    })
}

/// Producer transaction `n`, retried as a service's caller would retry it: a transient
/// failure (the database restarting, a connection cut) is retried with backoff, and
/// since a failed commit may still have happened, the business row decides whether
/// there is anything left to retry (no message is sent twice under two ids). Gives up
/// at `give_up` (the bench's deadline).
async fn produce_retrying<S: BenchStore>(
    store: &S,
    n: u64,
    pad: &str,
    msg: courier::core::Message,
    give_up: tokio::time::Instant,
) -> Result<()> {
    let mut failures = 0u32;
    loop {
        let error = match store.produce(n, pad, msg.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) if is_transient(&e) => e,
            Err(e) => return Err(e.context(format!("producer transaction {n}"))),
        };
        loop {
            if tokio::time::Instant::now() >= give_up {
                return Err(error.context(format!(
                    "producer transaction {n}: still failing at the bench's deadline"
                )));
            }
            failures += 1;
            if failures.is_power_of_two() {
                eprintln!(
                    "bench: producer transaction {n} failed ({failures} time(s)), retrying: {error:#}"
                );
            }
            let ms = 50u64.saturating_mul(1 << failures.min(6)).min(2_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            match store.committed(n).await {
                Ok(true) => return Ok(()),
                Ok(false) => break,
                Err(e) if is_transient(&e) => continue,
                Err(e) => return Err(e.context(format!("checking producer transaction {n}"))),
            }
        }
    }
}

/// Whether retrying `e` may help: Courier's own status, or for a raw sqlx error a lost
/// connection, a server shutting down or starting up, a serialisation failure.
fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        if let Some(e) = cause.downcast_ref::<courier::core::Error>() {
            return e.is_retryable();
        }
        match cause.downcast_ref::<sqlx::Error>() {
            Some(
                sqlx::Error::Io(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::WorkerCrashed,
            ) => true,
            Some(sqlx::Error::Database(db)) => db.code().is_some_and(|c| {
                ["08", "40", "53", "57"]
                    .iter()
                    .any(|class| c.starts_with(class))
            }),
            _ => false,
        }
    })
}

fn progress_bar(total: u64, json: bool) -> indicatif::ProgressBar {
    let pb = if json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::with_draw_target(
            Some(total),
            indicatif::ProgressDrawTarget::stderr(),
        )
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} handled ({msg}) {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

fn print_human(r: &Report) {
    println!(
        "courier bench: {} messages, {} producers, {} partitions, db {}, broker {}, sync={}{}",
        r.messages,
        r.producers,
        r.partitions,
        r.db,
        r.broker,
        r.sync,
        r.rate
            .map(|x| format!(", offered {x} msg/s"))
            .unwrap_or_default()
    );
    println!(
        "  end to end        {:>10.0} msg/s  ({:.2} s)",
        r.throughput_msgs_per_s, r.seconds
    );
    println!(
        "  producers alone   {:>10.0} tx/s   (their own commits: business row + outbox message)",
        r.producer_commit_rate_per_s
    );
    println!(
        "  raw db commit     {:>10.0} /s     (same run, BEGIN; INSERT; COMMIT per row; ratio {:.2})",
        r.raw_commit_rate_per_s, r.throughput_vs_raw
    );
    if let (Some(auto), Some(ratio)) = (r.raw_autocommit_rate_per_s, r.throughput_vs_raw_autocommit)
    {
        println!(
            "                    {auto:>10.0} /s     (one autocommit INSERT per row; ratio {ratio:.2})"
        );
    }
    if let Some(pool) = r.raw_commit_rate_pool_per_s {
        println!("                    {pool:>10.0} /s     (autocommit through a sqlx pool)");
    }
    println!(
        "  raw broker publish{:>10.0} /s     (same run, the broker's own client, confirmed)",
        r.raw_publish_rate_per_s
    );
    if let Some(raw) = r.raw_publish_with_headers_rate_per_s {
        println!(
            "                    {raw:>10.0} /s     (the same with Courier's headers and a Nats-Msg-Id each)"
        );
    }
    if let (Some(rate), Some(ratio)) = (r.relay_only_msgs_per_s, r.relay_only_vs_raw_publish) {
        println!(
            "  relay alone       {rate:>10.0} msg/s  (outbox -> broker; ratio to raw publish {ratio:.2})"
        );
    }
    if let Some(ratio) = r.relay_only_vs_raw_publish_with_headers {
        println!(
            "                                  (ratio to raw publish with headers {ratio:.2})"
        );
    }
    println!(
        "  commit -> handler p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        r.latency_ms.p50, r.latency_ms.p99, r.latency_ms.max
    );
    println!(
        "  lost {}, duplicates applied {}",
        r.lost, r.duplicates_applied
    );
}

/// The consumer process: one group member with the inbox, recording each effect.
async fn consumer(args: BenchArgs) -> Result<()> {
    let dir = args
        .dir
        .clone()
        .context("--internal-consumer needs --dir")?;
    let setup = Setup::new(&args, &dir)?;
    let broker = setup.broker().await?;
    match &setup.db {
        DbSpec::Sqlite { .. } => {
            let store = setup.db.open_sqlite(Side::Consumer).await?;
            consume(
                store.context("the consumer database")?,
                &broker,
                &setup,
                &args,
            )
            .await
        }
        DbSpec::Postgres { .. } => {
            let store: Option<PgStore> = setup.db.open_pg(Side::Consumer).await?;
            consume(
                store.context("the consumer database")?,
                &broker,
                &setup,
                &args,
            )
            .await
        }
    }
}

async fn consume<S: BenchStore>(
    store: S,
    broker: &Broker,
    setup: &Setup,
    args: &BenchArgs,
) -> Result<()> {
    let group = GroupName::new(GROUP)?;
    let subscription = broker
        .subscriber()
        .subscribe(SubscribeOptions::new(setup.channel.clone(), group.clone()).buffer(1024))
        .await?;
    let dispatcher = Dispatcher::new(store, group)
        .with_config(DispatcherConfig::default().max_batch(128))
        .on(|ctx: HandlerContext<S>, p: Ping| async move {
            let now = now_us();
            S::record_effect(&ctx, p.n, now.saturating_sub(p.ts_us), now).await?;
            Ok(())
        });
    let stats = dispatcher.stats();
    let expected = args.messages;
    let parent = args.parent_pid;
    let done = async move {
        // Stop when every message was handled, or when the bench process is gone.
        let mut ticks = 0u32;
        loop {
            if stats.handled.load(Ordering::Relaxed) >= expected {
                return;
            }
            ticks += 1;
            if ticks.is_multiple_of(100)
                && let Some(pid) = parent
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                eprintln!("bench consumer: the bench process {pid} is gone; stopping");
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    println!("ready");
    dispatcher.run(subscription, done).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_transient;

    #[test]
    fn a_lost_connection_is_retried_a_bad_statement_is_not() {
        let cut = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "eof");
        assert!(is_transient(&anyhow::Error::new(sqlx::Error::Io(cut))));
        assert!(is_transient(
            &anyhow::Error::new(sqlx::Error::PoolTimedOut).context("producer")
        ));
        assert!(!is_transient(&anyhow::Error::new(
            sqlx::Error::ColumnNotFound("n".into())
        )));
        let unavailable = courier::core::Error::new(courier::core::ErrorKind::Unavailable, "down");
        assert!(is_transient(&anyhow::Error::new(unavailable)));
        assert!(!is_transient(&anyhow::Error::new(
            courier::core::Error::invalid("bad")
        )));
    }
}
