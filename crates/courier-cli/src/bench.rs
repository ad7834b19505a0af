//! `courier bench`: the end-to-end benchmark of the embedded default.
//!
//! Producer tasks commit a business row plus one outbox message per transaction; the
//! relay moves them to the embedded broker; a consumer group member in a SEPARATE OS
//! process (this binary, `bench --internal-consumer`) handles each message with the
//! inbox, writing an effect row. `lost` and `duplicates_applied` are counted from the
//! consumer's database; latency is commit → handler, measured by the handler.

use anyhow::{Context, Result, bail};
use courier::sqlite::{
    Relay, SqliteBroker, SqliteBrokerConfig, SqliteStore, SqliteStoreOptions, Sync,
};
use courier::{
    ChannelName, Contract, Dispatcher, DispatcherConfig, GroupName, HandlerContext, JsonCodec,
    MessageKind, SubscribeOptions, Subscriber,
};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

const CHANNEL: &str = "bench";
const GROUP: &str = "bench-consumer";

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

/// Arguments of `courier bench`.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "End-to-end benchmark of the embedded default (SQLite service databases + \
embedded SQLite broker).

Producer tasks each commit a business row plus one outbox message per transaction; the \
relay publishes them to the broker; a consumer group member in a separate OS process \
handles each message with the inbox and records an effect. Reports end-to-end \
throughput, commit -> handler latency (p50/p99/max), and, measured in the same run with \
the same driver and settings, the raw single-row SQLite commit rate of this machine in \
three ways: autocommit INSERT on a held connection (raw_commit_rate_per_s, the headline), \
BEGIN; INSERT; COMMIT per row (raw_tx_commit_rate_per_s), and autocommit through a pool \
(raw_commit_rate_pool_per_s); see BENCHMARKS.md. \
`lost` and `duplicates_applied` are counted from the consumer's database; the exit code \
is non-zero unless both are 0.

Examples:
  courier bench --messages 20000
  courier bench --messages 5000 --rate 1000 --json     # steady load, latency focus"
)]
pub(crate) struct BenchArgs {
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
    /// Durability of every database in the run
    #[arg(long, value_enum, default_value = "normal")]
    pub(crate) sync: SyncArg,
    /// Keep the databases in DIR (default: a temporary directory, removed afterwards)
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<PathBuf>,
    /// Give up (and report what was lost) after this many seconds
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_secs: u64,
    /// Run as the consumer process (used by the bench itself)
    #[arg(long, hide = true)]
    pub(crate) internal_consumer: bool,
    /// The bench process the consumer belongs to (used by the bench itself)
    #[arg(long, hide = true)]
    pub(crate) parent_pid: Option<u32>,
}

#[derive(Serialize, Deserialize)]
struct Ping {
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
    throughput_vs_raw: f64,
    raw_commit_rate_pool_per_s: f64,
    raw_tx_commit_rate_per_s: f64,
    throughput_vs_raw_tx: f64,
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

/// Run the bench (or, with `--internal-consumer`, its consumer process).
pub(crate) async fn run(args: BenchArgs, json: bool) -> Result<()> {
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
    let sync = args.sync.sync();

    // 1. The raw reference, on a quiet machine, same driver and settings: single-row
    //    autocommit INSERTs on one held connection (how Courier's writer commits), and,
    //    for comparison, through a pool.
    let measure = async |file: &str, via: courier::sqlite::RawPath| {
        courier::sqlite::raw_commit_rate(
            &dir.join(file),
            sync,
            via,
            args.payload_bytes,
            Duration::from_secs(1),
            1_000_000,
        )
        .await
        .with_context(|| format!("measuring the raw SQLite commit rate ({via:?})"))
    };
    let raw = measure("raw.db", courier::sqlite::RawPath::Connection).await?;
    let raw_pool = measure("raw-pool.db", courier::sqlite::RawPath::Pool).await?;
    let raw_tx = measure("raw-tx.db", courier::sqlite::RawPath::Transaction).await?;

    // 2. Producer side: service database + relay, broker with the channel.
    let (store, broker, channel) = open_side(
        &dir,
        "producer.db",
        "CREATE TABLE IF NOT EXISTS business (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, body TEXT NOT NULL)",
        sync,
        args.partitions,
    )
    .await?;

    // 3. The consumer, as its own OS process.
    let exe = std::env::current_exe().context("finding the courier binary")?;
    let mut child = tokio::process::Command::new(exe)
        .arg("bench")
        .arg("--internal-consumer")
        .arg("--dir")
        .arg(&dir)
        .arg("--messages")
        .arg(args.messages.to_string())
        .arg("--partitions")
        .arg(args.partitions.to_string())
        .arg("--sync")
        .arg(args.sync.name())
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
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
    let relay = tokio::spawn(Relay::new(store.clone(), broker.clone()).run(async move {
        let _ = relay_stopped.await;
    }));

    // 5. Producers.
    let progress = progress_bar(args.messages, json);
    let next = Arc::new(AtomicU64::new(0));
    let committed = Arc::new(AtomicU64::new(0));
    let start_us = now_us();
    let start = tokio::time::Instant::now();
    let pad = "x".repeat(args.payload_bytes.saturating_sub(40));
    let mut producers = Vec::new();
    for _ in 0..args.producers {
        let (store, channel, next, committed, pad) = (
            store.clone(),
            channel.clone(),
            next.clone(),
            committed.clone(),
            pad.clone(),
        );
        let (n_total, rate, keys) = (args.messages, args.rate, args.keys.max(1));
        producers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= n_total {
                    return anyhow::Ok(());
                }
                if let Some(r) = rate {
                    tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / r)).await;
                }
                let mut tx = store.begin().await?;
                sqlx::query("INSERT INTO business (n, body) VALUES (?, ?)")
                    .bind(n as i64)
                    .bind(&pad)
                    .execute(&mut *tx)
                    .await?;
                let ping = Ping {
                    n,
                    ts_us: now_us(),
                    pad: pad.clone(),
                };
                let msg =
                    JsonCodec::encode_to(&ping, &channel)?.with_key(format!("key-{}", n % keys))?;
                store.outbox().send(&mut tx, msg).await?;
                tx.commit().await?;
                committed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // 6. Wait for the consumer to finish, showing progress.
    let consumer_db = dir.join("consumer.db");
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut counter: Option<sqlx::SqlitePool> = None;
    let status = loop {
        tokio::select! {
            s = child.wait() => break Some(s?),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if counter.is_none() {
            counter = sqlx::SqlitePool::connect(&format!("sqlite:{}", consumer_db.display()))
                .await
                .ok();
        }
        let handled = match &counter {
            Some(p) => sqlx::query_scalar::<_, i64>("SELECT count(*) FROM effects")
                .fetch_one(p)
                .await
                .unwrap_or(0),
            None => 0,
        };
        progress.set_position(handled.max(0) as u64);
        progress.set_message(format!("committed {}", committed.load(Ordering::Relaxed)));
        if Instant::now() > deadline {
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
    let pool = match counter {
        Some(p) => p,
        None => sqlx::SqlitePool::connect(&format!("sqlite:{}", consumer_db.display())).await?,
    };
    let (rows, distinct, last_us): (i64, i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), count(DISTINCT n), max(handled_at_us) FROM effects")
            .fetch_one(&pool)
            .await?;
    let latencies: Vec<i64> = sqlx::query_scalar("SELECT latency_us FROM effects")
        .fetch_all(&pool)
        .await?;
    pool.close().await;
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for l in latencies {
        hist.saturating_record(l.max(1) as u64);
    }
    let seconds = (last_us.unwrap_or(start_us as i64) as f64 - start_us as f64).max(1.0) / 1e6;
    let throughput = distinct as f64 / seconds;
    let report = Report {
        messages: args.messages,
        seconds,
        throughput_msgs_per_s: throughput,
        raw_commit_rate_per_s: raw,
        latency_ms: Latency {
            p50: hist.value_at_quantile(0.50) as f64 / 1000.0,
            p99: hist.value_at_quantile(0.99) as f64 / 1000.0,
            max: hist.max() as f64 / 1000.0,
        },
        lost: args.messages.saturating_sub(distinct as u64),
        duplicates_applied: (rows - distinct) as u64,
        throughput_vs_raw: throughput / raw,
        raw_commit_rate_pool_per_s: raw_pool,
        raw_tx_commit_rate_per_s: raw_tx,
        throughput_vs_raw_tx: throughput / raw_tx,
        producers: args.producers,
        partitions: args.partitions,
        rate: args.rate,
        sync: args.sync.name(),
        payload_bytes: args.payload_bytes,
    };
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
        "courier bench: {} messages, {} producers, {} partitions, sync={}{}",
        r.messages,
        r.producers,
        r.partitions,
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
        "  raw SQLite commit {:>10.0} /s     (same run, single-row autocommit, held connection)",
        r.raw_commit_rate_per_s
    );
    println!(
        "                    {:>10.0} /s     (the same through a sqlx pool)",
        r.raw_commit_rate_pool_per_s
    );
    println!(
        "                    {:>10.0} /s     (BEGIN; INSERT; COMMIT per row, held connection; ratio {:.2})",
        r.raw_tx_commit_rate_per_s, r.throughput_vs_raw_tx
    );
    println!("  ratio             {:>10.2}", r.throughput_vs_raw);
    println!(
        "  commit -> handler p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        r.latency_ms.p50, r.latency_ms.p99, r.latency_ms.max
    );
    println!(
        "  lost {}, duplicates applied {}",
        r.lost, r.duplicates_applied
    );
}

/// One side of the bench: its service database (with its table), the shared broker and
/// the bench channel.
async fn open_side(
    dir: &std::path::Path,
    db_file: &str,
    table: &'static str,
    sync: Sync,
    partitions: u32,
) -> Result<(SqliteStore, SqliteBroker, ChannelName)> {
    let store =
        SqliteStore::open_with(dir.join(db_file), SqliteStoreOptions::default().sync(sync)).await?;
    sqlx::query(table).execute(store.pool()).await?;
    let broker = SqliteBroker::open_with(
        dir.join("broker.db"),
        SqliteBrokerConfig::default().sync(sync),
    )
    .await?;
    let channel = ChannelName::new(CHANNEL)?;
    broker.create_channel(&channel, partitions).await?;
    Ok((store, broker, channel))
}

/// The consumer process: one group member with the inbox, recording each effect.
async fn consumer(args: BenchArgs) -> Result<()> {
    let dir = args.dir.context("--internal-consumer needs --dir")?;
    let sync = args.sync.sync();
    let (store, broker, channel) = open_side(
        &dir,
        "consumer.db",
        "CREATE TABLE IF NOT EXISTS effects (n INTEGER NOT NULL, latency_us INTEGER NOT NULL, handled_at_us INTEGER NOT NULL)",
        sync,
        args.partitions,
    )
    .await?;
    let group = GroupName::new(GROUP)?;
    let subscription = broker
        .subscribe(SubscribeOptions::new(channel, group.clone()).buffer(1024))
        .await?;
    let dispatcher = Dispatcher::new(store.clone(), group)
        .with_config(DispatcherConfig::default().max_batch(128))
        .on(|ctx: HandlerContext<SqliteStore>, p: Ping| async move {
            let now = now_us();
            sqlx::query("INSERT INTO effects (n, latency_us, handled_at_us) VALUES (?, ?, ?)")
                .bind(p.n as i64)
                .bind(now.saturating_sub(p.ts_us) as i64)
                .bind(now as i64)
                .execute(&mut *ctx.tx().await)
                .await?;
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
