//! `courier publish`: publish messages to a channel of the broker.

use super::broker::Broker;
use super::common::{self, Access};
use anyhow::{Context, Result, bail};
use courier::core::headers::{CONTENT_TYPE, DESTINATION, PARTITION_KEY, TYPE};
use courier::core::{ChannelName, Message, MessageType, Publisher as _};
use std::io::{IsTerminal, Read};

/// Messages published in one broker transaction.
const BATCH: usize = 500;

/// Publish one message (or one per stdin line) with a key, a type and headers.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Publish a message to a channel of the broker and print its id and \
position (partition/offset).

The payload is the PAYLOAD argument; without it (or with -) it is read from stdin: the whole \
input is one message (a final newline is dropped), or with --lines every non-empty line is \
one message. The content-type header is application/json when the payload parses as JSON, \
else text/plain (override with --header content-type=...). Messages with the same --key go \
to the same partition and are consumed in order.

Examples:
  courier publish --broker sqlite:broker.db --channel orders --key order-1 --type order.OrderPlaced '{\"id\":1}'
  cat events.jsonl | courier publish --channel orders --lines --json
  courier publish --broker nats://127.0.0.1:4222 --channel orders --partitions 8 --key order-1 '{\"id\":1}'"
)]
pub(crate) struct Args {
    /// The broker: sqlite:PATH, nats://HOST:PORT, amqp://USER:PASSWORD@HOST:PORT/VHOST or postgres://USER@HOST/DB
    #[arg(long, env = "COURIER_BROKER", default_value = common::DEFAULT_BROKER, value_name = "URL")]
    broker: String,

    /// The channel to publish to
    #[arg(long, value_name = "NAME")]
    channel: String,

    /// Partition key: messages with one key are consumed in order
    #[arg(long, value_name = "K")]
    key: Option<String>,

    /// Message type (sets the `type` header), e.g. order.OrderPlaced
    #[arg(long = "type", value_name = "T")]
    message_type: Option<String>,

    /// Extra header, repeatable (names: lower-case letters, digits, '-', '_', '.')
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,

    /// Create the channel with N partitions if it does not exist yet
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    partitions: Option<u32>,

    /// Read stdin and publish one message per non-empty line
    #[arg(long)]
    lines: bool,

    /// The payload; omit it or give - to read stdin
    #[arg(value_name = "PAYLOAD")]
    payload: Option<String>,
}

pub(crate) async fn run(args: Args, json: bool) -> Result<()> {
    let channel = ChannelName::new(args.channel.as_str())
        .with_context(|| format!("invalid --channel {:?}", args.channel))?;
    let message_type = args
        .message_type
        .as_deref()
        .map(|t| MessageType::new(t).with_context(|| format!("invalid --type {t:?}")))
        .transpose()?;
    let headers = parse_headers(&args.headers)?;
    let payloads = payloads(&args)?;

    let mut messages = Vec::with_capacity(payloads.len());
    for payload in payloads {
        messages.push(build(
            &channel,
            &args,
            message_type.as_ref(),
            &headers,
            payload,
        )?);
    }

    let broker = Broker::open(&args.broker, Access::Create).await?;
    let publisher = broker.publisher();
    if let Some(n) = args.partitions {
        broker
            .create_channel(&channel, n)
            .await
            .with_context(|| format!("cannot create channel {channel} with {n} partitions"))?;
    }
    for batch in messages.chunks(BATCH) {
        let receipt = publisher.publish(batch).await.with_context(|| {
            format!(
                "cannot publish to channel {channel} in broker {}",
                broker.describe()
            )
        })?;
        for (m, pos) in batch.iter().zip(&receipt.positions) {
            let (partition, offset) = match pos {
                Some(p) => (Some(p.partition), Some(p.offset)),
                None => (None, None),
            };
            if json {
                common::out_json(&serde_json::json!({
                    "id": m.id.to_string(),
                    "channel": channel.as_str(),
                    "partition": partition,
                    "offset": offset,
                }))?;
            } else {
                let at = match pos {
                    Some(p) => format!("{}/{}", p.partition, p.offset),
                    None => "-".to_owned(),
                };
                common::out(format_args!("{}  {channel}  {at}", m.id))?;
            }
        }
    }
    Ok(())
}

fn parse_headers(raw: &[String]) -> Result<Vec<(String, String)>> {
    raw.iter()
        .map(|h| {
            let Some((name, value)) = h.split_once('=') else {
                bail!("--header {h:?}: expected NAME=VALUE, e.g. --header x-tenant=acme");
            };
            if name == DESTINATION.as_str() {
                bail!("--header {name}: the destination is set by --channel");
            }
            Ok((name.to_owned(), value.to_owned()))
        })
        .collect()
}

/// The payloads to publish: the argument, the whole of stdin, or its lines.
fn payloads(args: &Args) -> Result<Vec<Vec<u8>>> {
    let from_stdin = matches!(args.payload.as_deref(), None | Some("-"));
    if !from_stdin {
        if args.lines {
            bail!("--lines reads stdin: drop the PAYLOAD argument (or give - instead)");
        }
        return Ok(vec![args.payload.clone().unwrap_or_default().into_bytes()]);
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("reading the payload from stdin; end it with Ctrl-D");
    }
    let mut input = Vec::new();
    stdin
        .lock()
        .read_to_end(&mut input)
        .context("cannot read the payload from stdin")?;
    if args.lines {
        let lines: Vec<Vec<u8>> = input
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .map(<[u8]>::to_vec)
            .collect();
        if lines.is_empty() {
            bail!("stdin had no non-empty lines: nothing to publish");
        }
        return Ok(lines);
    }
    if input.is_empty() {
        bail!("stdin was empty: pass the payload as an argument, or pipe it in");
    }
    if input.ends_with(b"\n") {
        input.pop();
        if input.ends_with(b"\r") {
            input.pop();
        }
    }
    Ok(vec![input])
}

fn build(
    channel: &ChannelName,
    args: &Args,
    message_type: Option<&MessageType>,
    headers: &[(String, String)],
    payload: Vec<u8>,
) -> Result<Message> {
    let content_type = if serde_json::from_slice::<serde_json::Value>(&payload).is_ok() {
        "application/json"
    } else {
        "text/plain"
    };
    let mut m = Message::new(payload).to(channel.clone());
    m.headers.insert(CONTENT_TYPE, content_type)?;
    if let Some(t) = message_type {
        m.headers.insert(TYPE, t.as_str())?;
    }
    if let Some(k) = &args.key {
        m.headers
            .insert(PARTITION_KEY, k.as_str())
            .with_context(|| format!("invalid --key {k:?}"))?;
    }
    for (name, value) in headers {
        m.headers
            .insert_raw(name, value.as_str())
            .with_context(|| format!("invalid --header {name}={value}"))?;
    }
    Ok(m)
}
