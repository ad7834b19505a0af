//! `courier`: inspect and operate Courier channels, dead letters and relays from a shell.

mod bench;
mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Inspect and operate Courier: channels, messages, dead letters, relays.
#[derive(Parser, Debug)]
#[command(
    name = "courier",
    version,
    about = "Inspect and operate Courier: channels, messages, dead letters, relays.",
    long_about = "Inspect and operate Courier: reliable async messaging with a transactional \
outbox, an idempotent inbox and an embedded SQLite broker.

Brokers and service databases are given as URLs: sqlite:PATH (the embedded default), \
postgres://USER[:PASSWORD]@HOST[:PORT]/DB, nats://HOST:PORT and amqp://USER:PASSWORD@HOST:PORT/VHOST \
(brokers only); each command's \
--help says which it accepts. --broker defaults to $COURIER_BROKER, else sqlite:.courier/broker.db; \
--db defaults to $COURIER_DB.

Examples:
  courier publish --broker sqlite:broker.db --channel orders --key order-1 '{\"id\":1}'
  courier tail --broker sqlite:broker.db --channel orders --from-beginning --json
  courier dlq list --db sqlite:orders.db"
)]
struct Cli {
    /// Print machine-readable JSON instead of tables (channels, publish, tail, dlq)
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Channels(cmd::channels::Args),
    Publish(cmd::publish::Args),
    Tail(cmd::tail::Args),
    Dlq(cmd::dlq::Args),
    Relay(cmd::relay::Args),
    // `about` only: a doc comment here would also replace the long help of `BenchArgs`.
    #[command(
        about = "End-to-end benchmark: outbox -> relay -> broker -> consumer group with inbox"
    )]
    Bench(bench::BenchArgs),
    Asyncapi(cmd::asyncapi::Args),
    Contract(cmd::contract::Args),
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Channels(args) => cmd::channels::run(args, json).await,
        Command::Publish(args) => cmd::publish::run(args, json).await,
        Command::Tail(args) => cmd::tail::run(args, json).await,
        Command::Dlq(args) => cmd::dlq::run(args, json).await,
        Command::Relay(args) => cmd::relay::run(args).await,
        Command::Bench(args) => bench::run(args, json).await,
        Command::Asyncapi(args) => cmd::asyncapi::run(args),
        Command::Contract(args) => cmd::contract::run(args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // `courier tail | head -3`: the reader went away, which is not an error.
        Err(e) if cmd::common::is_broken_pipe(&e) => ExitCode::SUCCESS,
        // `courier contract check`: 1 breaking, 2 unreadable document.
        Err(e) if e.is::<cmd::contract::Exit>() => e
            .downcast_ref::<cmd::contract::Exit>()
            .map_or(ExitCode::FAILURE, cmd::contract::Exit::report),
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text the line already
/// says (library errors often repeat their source in their own message).
fn describe(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn repeated_causes_are_said_once() {
        let inner = std::io::Error::other("role \"x\" does not exist");
        let e = anyhow::Error::new(inner)
            .context("cannot connect: role \"x\" does not exist")
            .context("cannot open the broker");
        assert_eq!(
            describe(&e),
            "cannot open the broker: cannot connect: role \"x\" does not exist"
        );
    }
}
