//! `courier tail`: follow a channel like `kcat -C`, without joining a consumer group.

use super::broker::{Broker, Cursor};
use super::common::{self, Access};
use anyhow::{Context, Result, bail};
use courier::core::{ChannelName, Malformed, Message, Position};
use std::time::Duration;
use tokio::time::Instant;

/// Messages read per query.
const FETCH: u32 = 256;
/// Read again at least this often, in case a wake-up was missed.
const POLL: Duration = Duration::from_millis(250);
/// Longest payload shown on a human-readable line.
const PAYLOAD_CHARS: usize = 200;

/// Follow a channel and print each message.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Follow a channel and print each message as it is published, like \
`kcat -C`. It reads the log directly and joins no consumer group, so it changes no offsets \
and takes no partitions from consumers.

By default it starts at the current end (only new messages); --from-beginning starts at the \
oldest retained message. Each line is `partition/offset  id  type  key  payload`; with --json \
it is one JSON object per line: {\"channel\",\"partition\",\"offset\",\"id\",\"headers\",\"payload\"} \
where payload is the JSON value when the payload is JSON, else a string. A stored row that \
is not a valid message prints {\"malformed\": reason, ...}.

Examples:
  courier tail --broker sqlite:broker.db --channel orders
  courier tail --channel orders --from-beginning --json --count 10 --timeout-ms 5000
  courier tail --broker amqp://guest:guest@127.0.0.1:5672/%2f --channel orders"
)]
pub(crate) struct Args {
    /// The broker: sqlite:PATH, postgres://USER@HOST/DB, nats://HOST:PORT or
    /// amqp://USER:PASSWORD@HOST:PORT/VHOST
    #[arg(long, env = "COURIER_BROKER", default_value = common::DEFAULT_BROKER, value_name = "URL")]
    broker: String,

    /// The channel to follow
    #[arg(long, value_name = "NAME")]
    channel: String,

    /// Start at the oldest retained message instead of the current end
    #[arg(long)]
    from_beginning: bool,

    /// Exit after N messages
    #[arg(long, value_name = "N")]
    count: Option<u64>,

    /// Exit after MS milliseconds without a new message (status 1 if --count was given and
    /// fewer arrived, else 0)
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
}

pub(crate) async fn run(args: Args, json: bool) -> Result<()> {
    let channel = ChannelName::new(args.channel.as_str())
        .with_context(|| format!("invalid --channel {:?}", args.channel))?;
    let broker = Broker::open(&args.broker, Access::Existing).await?;
    let err = || {
        format!(
            "cannot read channel {channel} in broker {}",
            broker.describe()
        )
    };
    if broker
        .describe_channels(Some(channel.as_str()))
        .await
        .with_context(err)?
        .is_empty()
    {
        eprintln!("channel {channel} does not exist yet; waiting for its first message");
    }
    let mut cursor = broker
        .tail_start(&channel, args.from_beginning)
        .await
        .with_context(err)?;
    match &cursor {
        Cursor::Global(after) => {
            eprintln!("following channel {channel} after offset {after} (Ctrl-C to stop)")
        }
        Cursor::PerPartition(after) => eprintln!(
            "following channel {channel} after offsets {after:?} (per partition; Ctrl-C to stop)"
        ),
        Cursor::Nats(..) | Cursor::Amqp(..) => {
            eprintln!("following channel {channel} (Ctrl-C to stop)")
        }
    }

    let timeout = args.timeout_ms.map(Duration::from_millis);
    let mut seen = 0u64;
    let mut last = Instant::now();
    if args.count == Some(0) {
        return Ok(());
    }
    // Taken before each read, so a commit between the read and the wait is not missed.
    let mut changes = broker.tail_changes(&channel);
    loop {
        let batch = broker
            .tail_read(&channel, &mut cursor, FETCH)
            .await
            .with_context(err)?;
        if batch.is_empty() {
            let wait = match timeout {
                Some(t) => {
                    let left = t.saturating_sub(last.elapsed());
                    if left.is_zero() {
                        return timed_out(&args, seen, t);
                    }
                    left.min(POLL)
                }
                None => POLL,
            };
            let _ = tokio::time::timeout(wait, changes.changed()).await;
            continue;
        }
        for (position, message) in batch {
            print(&channel, position, &message, json)?;
            seen += 1;
            if args.count.is_some_and(|n| seen >= n) {
                return Ok(());
            }
        }
        last = Instant::now();
    }
}

fn timed_out(args: &Args, seen: u64, timeout: Duration) -> Result<()> {
    match args.count {
        Some(n) if seen < n => bail!(
            "only {seen} of {n} messages arrived on channel {} before {} ms passed without one",
            args.channel,
            timeout.as_millis()
        ),
        _ => Ok(()),
    }
}

fn print(
    channel: &ChannelName,
    position: Position,
    message: &std::result::Result<Message, Malformed>,
    json: bool,
) -> Result<()> {
    match (message, json) {
        (Ok(m), true) => common::out_json(&serde_json::json!({
            "channel": channel.as_str(),
            "partition": position.partition,
            "offset": position.offset,
            "id": m.id.to_string(),
            "headers": m.headers.as_map(),
            "payload": common::payload_value(Some(&m.headers), &m.payload),
        })),
        (Err(bad), true) => common::out_json(&serde_json::json!({
            "malformed": bad.reason,
            "channel": channel.as_str(),
            "partition": position.partition,
            "offset": position.offset,
            "id": bad.raw_id,
            "headers": bad.raw_headers,
            "payload": common::payload_value(None, &bad.payload),
        })),
        (Ok(m), false) => common::out(format_args!(
            "{}/{}  {}  {}  {}  {}",
            position.partition,
            position.offset,
            m.id,
            common::or_dash(m.headers.get(courier::core::headers::TYPE)),
            common::or_dash(m.headers.partition_key()),
            common::one_line(&String::from_utf8_lossy(&m.payload), PAYLOAD_CHARS),
        )),
        (Err(bad), false) => common::out(format_args!(
            "{}/{}  {}  MALFORMED ({})  {}",
            position.partition,
            position.offset,
            common::one_line(&bad.raw_id, 60),
            common::one_line(&bad.reason, PAYLOAD_CHARS),
            common::one_line(&String::from_utf8_lossy(&bad.payload), PAYLOAD_CHARS),
        )),
    }
}
