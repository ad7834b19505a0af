//! `courier asyncapi`: a service's AsyncAPI 3.0 document, from its description.

use anyhow::{Context, Result};
use courier::core::describe::{
    Action, MessageDescription, OperationDescription, ServiceDescription, Style,
};
use std::io::{Read, Write};
use std::path::PathBuf;

/// Print the AsyncAPI 3.0 document of a service
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Print the AsyncAPI 3.0 document of a service: its channels, its operations \
(what it sends and receives; commands with their reply and failure types and where replies \
go) and its message types, with payload JSON Schemas generated from the Rust types \
(schemars) and the schema of Courier's headers. The document passes the official AsyncAPI \
parser; `courier contract check OLD NEW` compares two of them.

The input (--from) is the service's description as JSON, what \
ServiceDescription::to_json() writes. A service builds it from its dispatcher (what it \
handles, and the replies it sends) merged with what it sends through its outbox:

  let description = ServiceDescription::new(\"order-service\")
      .sends_command::<CreateTicket>()
      .publishes::<OrderPlaced>()
      .merge(dispatcher.description(\"order-service\"));
  std::fs::write(\"order-service.json\", description.to_json())?;

In Rust, courier_asyncapi::asyncapi(&description) gives the same document directly \
(.to_yaml(), .to_json()), e.g. to serve it or write it in a test.

Without --from, prints the document of `courier bench`'s own messages (bench.Ping on \
channel bench), so the command works with no set-up.

Examples:
  courier asyncapi
  courier asyncapi --from order-service.json --output asyncapi.yaml
  cat order-service.json | courier asyncapi --from - --format json"
)]
pub(crate) struct Args {
    /// The service description (JSON of ServiceDescription::to_json()); `-` reads stdin.
    /// Default: courier bench's own messages
    #[arg(long, value_name = "FILE|-")]
    from: Option<PathBuf>,

    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Yaml)]
    format: Format,

    /// Write the document to FILE instead of stdout
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// YAML
    Yaml,
    /// JSON (pretty)
    Json,
}

pub(crate) fn run(args: Args) -> Result<()> {
    let description = match &args.from {
        Some(path) => read_description(path)?,
        None => bench_description(),
    };
    let doc = courier_asyncapi::asyncapi(&description);
    let text = match args.format {
        Format::Yaml => doc.to_yaml()?,
        Format::Json => doc.to_json()?,
    };
    match &args.output {
        Some(path) => std::fs::write(path, text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(text.as_bytes())?;
            stdout.flush()?;
        }
    }
    Ok(())
}

fn read_description(path: &std::path::Path) -> Result<ServiceDescription> {
    let (name, text) = if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the service description from stdin")?;
        ("stdin".to_owned(), text)
    } else {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        (path.display().to_string(), text)
    };
    serde_json::from_str(&text).with_context(|| {
        format!("{name} is not a service description (the JSON of ServiceDescription::to_json())")
    })
}

/// What `courier bench` sends and receives: `bench.Ping` on channel `bench`, written by
/// the producers' outbox and handled by the consumer group.
fn bench_description() -> ServiceDescription {
    use crate::bench::{CHANNEL, GROUP, Ping};
    ServiceDescription::new("courier-bench")
        .describe(
            "The end-to-end benchmark of `courier bench`: producers commit bench.Ping \
             through their outbox, a consumer group handles them with its inbox.",
        )
        .sends::<Ping>(CHANNEL)
        .operation(OperationDescription {
            action: Action::Receive,
            channel: Some(CHANNEL.to_owned()),
            style: Style::Message,
            message: MessageDescription::of::<Ping>(),
            replies: Vec::new(),
            group: Some(GROUP.to_owned()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_document_sends_and_receives_ping() {
        let doc = courier_asyncapi::asyncapi(&bench_description());
        assert_eq!(doc.info.title, "courier-bench");
        assert!(doc.operations.contains_key("send_bench_Ping_v1"));
        assert!(doc.operations.contains_key("receive_bench_Ping_v1"));
        assert_eq!(doc.channels["bench"].address.as_deref(), Some("bench"));
    }
}
