//! `courier channels`: channels, partitions, messages; each group's members and lag.

use super::broker::Broker;
use super::common::{self, Access};
use anyhow::{Result, bail};
use courier::core::admin::ChannelInfo;

/// List channels with their partitions and message counts, and each consumer group's
/// live members and lag.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "List the channels of a broker: partitions and stored messages, and \
for each consumer group its live members and lag (messages not yet committed).

With --json, prints the description as a JSON array (one object per channel with \
partition_info and groups, each group with its per-partition committed offset, owner and lag).

Examples:
  courier channels --broker sqlite:broker.db
  courier channels --broker sqlite:broker.db --channel orders --json
  courier channels --broker postgres://app@127.0.0.1/orders
  courier channels --broker amqp://guest:guest@127.0.0.1:5672/%2f --channel orders

On RabbitMQ (amqp://), --channel is required: AMQP cannot list queues (only the \
management plugin's HTTP API can, which Courier does not use), and a channel's consumer \
groups cannot be found either, so no groups are shown. MESSAGES counts the offsets a \
partition's stream retains, including one start marker per consumer group that started \
at the end."
)]
pub(crate) struct Args {
    /// The broker: sqlite:PATH, postgres://USER@HOST/DB, nats://HOST:PORT or
    /// amqp://USER:PASSWORD@HOST:PORT/VHOST
    #[arg(long, env = "COURIER_BROKER", default_value = common::DEFAULT_BROKER, value_name = "URL")]
    broker: String,

    /// Only this channel
    #[arg(long, value_name = "NAME")]
    channel: Option<String>,
}

pub(crate) async fn run(args: Args, json: bool) -> Result<()> {
    let broker = Broker::open(&args.broker, Access::Existing).await?;
    let channels = broker.describe_channels(args.channel.as_deref()).await?;
    if let Some(name) = &args.channel
        && channels.is_empty()
    {
        // RabbitMQ cannot list channels; the others can. The URL is shown without its
        // password.
        let listing = match broker {
            Broker::Amqp(_) => String::new(),
            _ => format!(
                "; `courier channels --broker {}` lists the channels",
                common::redact(&args.broker)
            ),
        };
        bail!(
            "no channel {name:?} in broker {}{listing} (a channel is created by its first \
             publish or subscription)",
            broker.describe(),
        );
    }
    if json {
        return common::out_json(&channels);
    }
    if channels.is_empty() {
        return common::out(format_args!(
            "no channels in broker {} yet (a channel is created by its first publish or subscription)",
            broker.describe()
        ));
    }
    common::out(render(&channels))
}

fn render(channels: &[ChannelInfo]) -> String {
    let mut rows = Vec::new();
    for c in channels {
        let channel = [
            c.channel.clone(),
            c.partitions.to_string(),
            c.messages.to_string(),
        ];
        if c.groups.is_empty() {
            rows.push(
                channel
                    .iter()
                    .cloned()
                    .chain(["-".into(), "-".into(), "-".into()])
                    .collect(),
            );
        }
        for g in &c.groups {
            rows.push(
                channel
                    .iter()
                    .cloned()
                    .chain([g.group.clone(), g.members.to_string(), g.lag.to_string()])
                    .collect(),
            );
        }
    }
    common::table(
        &[
            "CHANNEL",
            "PARTITIONS",
            "MESSAGES",
            "GROUP",
            "MEMBERS",
            "LAG",
        ],
        &rows,
    )
}
