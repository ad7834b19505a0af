//! `courier dlq`: list, show, retry and discard the dead letters of a service database.

use super::common;
use anyhow::{Context, Result, bail};
use courier::core::DeadLetter;
use std::collections::BTreeSet;

/// Dead letters of a service database: list, show, retry, discard.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Dead letters of a service database: messages a subscriber could not \
handle, kept with their last error. A dead letter from a handler failure blocks its key: \
later messages with that key are parked (status parked) until the dead letter is retried \
and succeeds, or is discarded.

Examples:
  courier dlq list --db sqlite:orders.db
  courier dlq retry 7 --db sqlite:orders.db"
)]
pub(crate) struct Args {
    /// The service database: sqlite:PATH or postgres://user@host/db
    #[arg(long, env = "COURIER_DB", value_name = "URL", global = true)]
    db: Option<String>,

    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand, Debug)]
enum Action {
    /// List dead letters, oldest first
    #[command(
        long_about = "List dead letters, oldest first: id, subscriber, status (dead, \
parked or retry), reason, attempts, key, type and the last error; then how many keys are \
blocked. --json prints a JSON array (without payloads; `dlq show` has them).

Examples:
  courier dlq list --db sqlite:orders.db
  courier dlq list --db sqlite:orders.db --subscriber shipping --json"
    )]
    List {
        /// Only dead letters of this subscriber (consumer group)
        #[arg(long, value_name = "S")]
        subscriber: Option<String>,

        /// Show at most N dead letters
        #[arg(long, value_name = "N", default_value_t = 1000)]
        limit: u32,
    },
    /// Show one dead letter in full: headers, payload, error
    #[command(
        long_about = "Show one dead letter in full: every field, its headers and its \
payload as text (--json: payload is the JSON value when it is JSON).

Example:
  courier dlq show 7 --db sqlite:orders.db"
    )]
    Show {
        /// The dead letter's id (from `dlq list`)
        id: i64,
    },
    /// Have the subscriber handle a dead letter again
    #[command(
        long_about = "Mark a dead letter for retry. The running subscriber picks it up \
within its redrive interval (500 ms by default) and handles it again; messages parked \
behind its key follow in order when it succeeds. If it fails again it goes back to dead. \
Only dead letters (not parked ones) can be retried.

Example:
  courier dlq retry 7 --db sqlite:orders.db"
    )]
    Retry {
        /// The dead letter's id (from `dlq list`)
        id: i64,
    },
    /// Delete a dead letter for good (needs --yes)
    #[command(
        long_about = "Delete a dead letter for good: its message is never handled. \
Messages parked behind its key are released for retry, in order. Needs --yes.

Example:
  courier dlq discard 7 --db sqlite:orders.db --yes"
    )]
    Discard {
        /// The dead letter's id (from `dlq list`)
        id: i64,

        /// Confirm: the message is deleted and never handled
        #[arg(long)]
        yes: bool,
    },
}

pub(crate) async fn run(args: Args, json: bool) -> Result<()> {
    let Some(db) = args.db else {
        bail!("no service database given: pass --db sqlite:PATH (or set COURIER_DB)");
    };
    let store = common::open_service_db(&db).await?;
    match args.action {
        Action::List { subscriber, limit } => {
            list(&store, subscriber.as_deref(), limit, json).await
        }
        Action::Show { id } => show(&store, id, json).await,
        Action::Retry { id } => retry(&store, id, json).await,
        Action::Discard { id, yes } => discard(&store, id, yes, json).await,
    }
}

async fn list(
    store: &common::ServiceDb,
    subscriber: Option<&str>,
    limit: u32,
    json: bool,
) -> Result<()> {
    let mut dls = store
        .dead_letters(subscriber, limit.saturating_add(1))
        .await
        .with_context(|| format!("cannot list the dead letters in {}", store.describe()))?;
    let more = dls.len() > limit as usize;
    dls.truncate(limit as usize);
    if json {
        return common::out_json(&dls);
    }
    if dls.is_empty() {
        return common::out(format_args!(
            "no dead letters{} in {}",
            subscriber
                .map(|s| format!(" of subscriber {s}"))
                .unwrap_or_default(),
            store.describe()
        ));
    }
    let rows: Vec<Vec<String>> = dls
        .iter()
        .map(|d| {
            let r = &d.record;
            vec![
                d.id.to_string(),
                r.subscriber.clone(),
                r.status.as_str().to_owned(),
                r.reason.as_str().to_owned(),
                r.attempts.to_string(),
                common::or_dash(r.partition_key.as_deref()),
                common::or_dash(r.message_type.as_deref()),
                common::one_line(&r.error, 60),
            ]
        })
        .collect();
    common::out(common::table(
        &[
            "ID",
            "SUBSCRIBER",
            "STATUS",
            "REASON",
            "ATTEMPTS",
            "KEY",
            "TYPE",
            "LAST ERROR",
        ],
        &rows,
    ))?;
    let blocked: BTreeSet<(&str, &str)> = dls
        .iter()
        .filter(|d| d.record.reason.blocks_key())
        .filter_map(|d| {
            Some((
                d.record.subscriber.as_str(),
                d.record.partition_key.as_deref()?,
            ))
        })
        .collect();
    common::out(format_args!(
        "{}{} dead letters; {}{} blocked keys (later messages with a blocked key are parked until \
         `courier dlq retry` or `discard`)",
        if more { "first " } else { "" },
        dls.len(),
        if more { "at least " } else { "" },
        blocked.len()
    ))?;
    if more {
        common::out(format_args!("more exist: raise --limit to see them"))?;
    }
    Ok(())
}

async fn find(store: &common::ServiceDb, id: i64) -> Result<DeadLetter> {
    store
        .dead_letter(id)
        .await
        .with_context(|| format!("cannot read dead letter {id} in {}", store.describe()))?
        .with_context(|| {
            format!(
                "no dead letter with id {id} in {}; `courier dlq list` shows the ids",
                store.describe()
            )
        })
}

fn to_json(d: &DeadLetter) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(d)?;
    if let Some(obj) = v.as_object_mut() {
        let ct = d
            .record
            .headers
            .get("content-type")
            .and_then(|c| c.as_str());
        let payload = match ct {
            Some(ct) if !ct.contains("json") => {
                serde_json::Value::String(String::from_utf8_lossy(&d.record.payload).into_owned())
            }
            _ => common::payload_value(None, &d.record.payload),
        };
        obj.insert("payload".into(), payload);
    }
    Ok(v)
}

async fn show(store: &common::ServiceDb, id: i64, json: bool) -> Result<()> {
    let d = find(store, id).await?;
    if json {
        return common::out_json(&to_json(&d)?);
    }
    let r = &d.record;
    let mut s = String::new();
    let mut field = |k: &str, v: &str| s.push_str(&format!("{k:<13} {v}\n"));
    field("id", &d.id.to_string());
    field("subscriber", &r.subscriber);
    field("channel", &r.channel);
    field("message id", &r.message_id);
    field("status", r.status.as_str());
    field("reason", r.reason.as_str());
    field(
        "blocks key",
        if r.reason.blocks_key() && r.partition_key.is_some() {
            "yes"
        } else {
            "no"
        },
    );
    field("key", &common::or_dash(r.partition_key.as_deref()));
    field("type", &common::or_dash(r.message_type.as_deref()));
    field("attempts", &r.attempts.to_string());
    field("first failed", &common::when(r.first_failed_at_ms));
    field("last failed", &common::when(r.last_failed_at_ms));
    field("error", &r.error);
    s.push_str("headers\n");
    match r.headers.as_object() {
        Some(h) => {
            for (k, v) in h {
                let v = v
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string());
                s.push_str(&format!("  {k}: {v}\n"));
            }
        }
        None => s.push_str(&format!("  (not a JSON object) {}\n", r.headers)),
    }
    match std::str::from_utf8(&r.payload) {
        Ok(text) => s.push_str(&format!("payload ({} bytes)\n{text}", r.payload.len())),
        Err(_) => s.push_str(&format!(
            "payload ({} bytes, not UTF-8; shown lossily)\n{}",
            r.payload.len(),
            String::from_utf8_lossy(&r.payload)
        )),
    }
    common::out(s.trim_end())
}

async fn retry(store: &common::ServiceDb, id: i64, json: bool) -> Result<()> {
    let d = store
        .retry_dead_letter(id)
        .await
        .with_context(|| format!("cannot retry dead letter {id}"))?;
    if json {
        return common::out_json(&d);
    }
    common::out(format_args!(
        "dead letter {id} (message {}) is queued for retry: the running subscriber {} picks it up \
         within its redrive interval (500 ms by default); `courier dlq list` shows whether it \
         succeeded (gone) or failed again (dead)",
        d.record.message_id, d.record.subscriber
    ))
}

async fn discard(store: &common::ServiceDb, id: i64, yes: bool, json: bool) -> Result<()> {
    let d = find(store, id).await?;
    if !yes {
        bail!(
            "discarding dead letter {id} (message {} of subscriber {}) deletes it for good; \
             run again with --yes to confirm",
            d.record.message_id,
            d.record.subscriber
        );
    }
    let d = store
        .discard_dead_letter(id)
        .await
        .with_context(|| format!("cannot discard dead letter {id}"))?;
    if json {
        return common::out_json(&d);
    }
    let released = match &d.record.partition_key {
        Some(k) if d.record.reason.blocks_key() => {
            format!("; messages parked behind key {k} are released for retry")
        }
        _ => String::new(),
    };
    common::out(format_args!(
        "discarded dead letter {id} (message {} of subscriber {}){released}",
        d.record.message_id, d.record.subscriber
    ))
}
