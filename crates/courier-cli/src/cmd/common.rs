//! What the subcommands share: backend URLs, opening files, output helpers.

use anyhow::{Context, Result, bail};
use courier::core::headers::CONTENT_TYPE;
use courier::core::{DeadLetter, Publisher};
use courier::core::{Headers, now_ms};
use courier::postgres::PgStore;
use courier::sqlite::{SqliteBroker, SqliteStore, parse_sqlite_url};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The broker used when neither `--broker` nor `COURIER_BROKER` is given.
pub(crate) const DEFAULT_BROKER: &str = "sqlite:.courier/broker.db";

/// Schemes of backends Courier plans but this build does not have.
const OTHER_BACKENDS: &[&str] = &[
    "postgres",
    "postgresql",
    "nats",
    "amqp",
    "amqps",
    "kafka",
    "redis",
    "mysql",
];

/// Whether a command may create the file, or only reads what is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Create the file (and the default `.courier` directory) if missing.
    Create,
    /// The file must exist: never create an empty one by looking at it.
    Existing,
}

/// The file behind a `sqlite:PATH` URL given to `flag`.
pub(crate) fn sqlite_path(flag: &str, url: &str) -> Result<PathBuf> {
    let scheme = url
        .split_once("://")
        .map(|(s, _)| s)
        .or_else(|| url.split_once(':').map(|(s, _)| s))
        .filter(|s| !s.eq_ignore_ascii_case("sqlite"));
    if let Some(scheme) = scheme
        && (url.contains("://") || OTHER_BACKENDS.contains(&scheme.to_ascii_lowercase().as_str()))
    {
        bail!(
            "{flag} {url}: backend {scheme} is not available for this command yet; use sqlite:PATH, \
             e.g. {flag} sqlite:./broker.db"
        );
    }
    parse_sqlite_url(url).with_context(|| format!("{flag} {url}: expected sqlite:PATH"))
}

fn require_file(path: &Path, what: &str, hint: &str) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => bail!("{} is not a file; {hint}", path.display()),
        Err(_) => bail!("no {what} at {}; {hint}", path.display()),
    }
}

/// Open the broker named by `url` (a `--broker` value).
pub(crate) async fn open_broker(url: &str, access: Access) -> Result<SqliteBroker> {
    let path = sqlite_path("--broker", url)?;
    match access {
        Access::Existing => require_file(
            &path,
            "broker",
            "check --broker (or COURIER_BROKER), or publish a message first to create it",
        )?,
        Access::Create => {
            if url == DEFAULT_BROKER
                && let Some(dir) = path.parent()
            {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create directory {}", dir.display()))?;
            }
        }
    }
    SqliteBroker::open(&path)
        .await
        .with_context(|| format!("cannot open broker {}", path.display()))
}

/// Open the service database named by `url` (a `--db` value); it must exist.
pub(crate) async fn open_store(url: &str) -> Result<SqliteStore> {
    let path = sqlite_path("--db", url)?;
    require_file(
        &path,
        "service database",
        "pass the database file your service opens with SqliteStore (--db sqlite:PATH or COURIER_DB)",
    )?;
    SqliteStore::open(&path)
        .await
        .with_context(|| format!("cannot open service database {}", path.display()))
}

/// `url` with the password of its user-info, if any, replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The lower-case scheme of a `scheme://...` URL.
fn url_scheme(url: &str) -> Option<String> {
    url.split_once("://").map(|(s, _)| s.to_ascii_lowercase())
}

/// A service database of any supported backend (`sqlite:PATH`, `postgres://...`).
pub(crate) enum ServiceDb {
    /// A SQLite file.
    Sqlite(SqliteStore),
    /// A PostgreSQL database.
    Postgres(PgStore),
}

impl ServiceDb {
    /// The file path or the URL without its password.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Sqlite(s) => s.path().display().to_string(),
            Self::Postgres(s) => courier::core::OutboxSource::describe(s),
        }
    }

    pub(crate) async fn dead_letters(
        &self,
        subscriber: Option<&str>,
        limit: u32,
    ) -> courier::Result<Vec<DeadLetter>> {
        match self {
            Self::Sqlite(s) => s.dead_letters(subscriber, limit).await,
            Self::Postgres(s) => s.dead_letters(subscriber, limit).await,
        }
    }

    pub(crate) async fn dead_letter(&self, id: i64) -> courier::Result<Option<DeadLetter>> {
        match self {
            Self::Sqlite(s) => s.dead_letter(id).await,
            Self::Postgres(s) => s.dead_letter(id).await,
        }
    }

    pub(crate) async fn retry_dead_letter(&self, id: i64) -> courier::Result<DeadLetter> {
        match self {
            Self::Sqlite(s) => s.retry_dead_letter(id).await,
            Self::Postgres(s) => s.retry_dead_letter(id).await,
        }
    }

    pub(crate) async fn discard_dead_letter(&self, id: i64) -> courier::Result<DeadLetter> {
        match self {
            Self::Sqlite(s) => s.discard_dead_letter(id).await,
            Self::Postgres(s) => s.discard_dead_letter(id).await,
        }
    }
}

/// Open the service database named by `url` (a `--db` value): `sqlite:PATH` (the file
/// must exist) or `postgres://user[:password]@host[:port]/database`.
pub(crate) async fn open_service_db(url: &str) -> Result<ServiceDb> {
    match url_scheme(url).as_deref() {
        Some("postgres" | "postgresql") => Ok(ServiceDb::Postgres(
            PgStore::connect(url)
                .await
                .context("cannot open the service database")?,
        )),
        _ => Ok(ServiceDb::Sqlite(open_store(url).await?)),
    }
}

/// Open a publisher for `url` (a `--broker` value, see [`super::broker::Broker::open`]).
/// Returns it with a description for logs.
pub(crate) async fn open_publisher(
    url: &str,
    access: Access,
) -> Result<(Arc<dyn Publisher>, String)> {
    let broker = super::broker::Broker::open(url, access).await?;
    Ok((broker.publisher(), broker.describe()))
}

/// Whether `e` is a write to a closed pipe (the reader exited).
pub(crate) fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Write one line to stdout and flush it (so `tail` output reaches pipes at once).
pub(crate) fn out(line: impl std::fmt::Display) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

/// Print `value` as JSON on one line.
pub(crate) fn out_json(value: &impl serde::Serialize) -> Result<()> {
    out(serde_json::to_string(value)?)
}

/// Format rows as a table with a header, columns padded to their widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_owned()
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push('\n');
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// `s` on one line (control characters escaped), at most `max` characters.
pub(crate) fn one_line(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&c.escape_default().to_string()),
            c => out.push(c),
        }
    }
    out
}

/// An optional field for a table cell.
pub(crate) fn or_dash(s: Option<&str>) -> String {
    s.unwrap_or("-").to_owned()
}

/// Whether a content type (if any) allows reading the payload as JSON.
fn may_be_json(content_type: Option<&str>) -> bool {
    content_type.is_none_or(|ct| {
        let ct = ct.split(';').next().unwrap_or(ct).trim();
        ct == "application/json" || ct.ends_with("+json")
    })
}

/// A payload for JSON output: the JSON value itself when it is JSON (and its
/// content type does not say otherwise), else the text (lossy for non-UTF-8 bytes).
pub(crate) fn payload_value(headers: Option<&Headers>, payload: &[u8]) -> serde_json::Value {
    let ct = headers.and_then(|h| h.get(CONTENT_TYPE));
    if may_be_json(ct)
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload)
    {
        return v;
    }
    serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
}

/// `ms` since the epoch, with how long ago that was.
pub(crate) fn when(ms: u64) -> String {
    let ago = now_ms().saturating_sub(ms) / 1000;
    let age = match ago {
        0..60 => format!("{ago}s"),
        60..3600 => format!("{}m{}s", ago / 60, ago % 60),
        3600..86400 => format!("{}h{}m", ago / 3600, ago % 3600 / 60),
        _ => format!("{}d{}h", ago / 86400, ago % 86400 / 3600),
    };
    format!("{ms} ms since epoch ({age} ago)")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            sqlite_path("--broker", "sqlite:a/b.db").unwrap(),
            PathBuf::from("a/b.db")
        );
        assert_eq!(
            sqlite_path("--broker", "b.db").unwrap(),
            PathBuf::from("b.db")
        );
        for url in [
            "postgres://localhost/x",
            "nats://h:4222",
            "amqp://h",
            "postgres:x",
        ] {
            let e = sqlite_path("--broker", url).unwrap_err().to_string();
            assert!(e.contains("not available for this command yet"), "{e}");
            assert!(e.contains("sqlite:PATH"), "{e}");
        }
        assert!(sqlite_path("--db", "sqlite:").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("nats://u:secret@h:4222"), "nats://u:***@h:4222");
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact("nats://token@h"), "nats://token@h");
    }

    #[test]
    fn one_line_escapes_and_truncates() {
        assert_eq!(one_line("a\nb", 10), "a\\nb");
        assert_eq!(one_line("abcdef", 3), "abc…");
        assert_eq!(one_line("abc", 3), "abc");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONG"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONG\nxyz  1");
    }

    #[test]
    fn payloads() {
        assert_eq!(
            payload_value(None, b"{\"a\":1}"),
            serde_json::json!({"a": 1})
        );
        let mut h = Headers::new();
        h.insert(CONTENT_TYPE, "text/plain").unwrap();
        assert_eq!(payload_value(Some(&h), b"12"), serde_json::json!("12"));
        assert_eq!(payload_value(None, b"hi"), serde_json::json!("hi"));
    }
}
