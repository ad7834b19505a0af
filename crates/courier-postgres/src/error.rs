//! The one place where sqlx errors become Courier errors, and URLs lose their passwords.

use courier_core::{Error, ErrorKind, ErrorStatus};

/// Map a sqlx error, with `what` saying what was being done (and on which database).
///
/// Serialization failures (`40001`), deadlocks (`40P01`), lock time-outs, lost
/// connections, a server shutting down or out of resources are transient: the same work
/// in a new transaction may succeed. Bad SQL, constraint violations, wrong credentials or
/// a missing database are permanent.
pub(crate) fn map(what: impl std::fmt::Display, e: sqlx::Error) -> Error {
    let (kind, status) = classify(&e);
    Error::new(kind, format!("{what}: {e}"))
        .with_status(status)
        .with_source(e)
}

fn classify(e: &sqlx::Error) -> (ErrorKind, ErrorStatus) {
    use ErrorKind::*;
    use ErrorStatus::*;
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match code.as_ref() {
                // serialization_failure, deadlock_detected
                "40001" | "40P01" => (Storage, Transient),
                // wrong password, no such role, no such database
                c if c.starts_with("28") || c == "3D000" => (Config, Permanent),
                // connection exceptions; admin shutdown, crash, cannot connect now
                c if c.starts_with("08") || c.starts_with("57") => (Unavailable, Transient),
                // transaction rollback, insufficient resources, lock not available (55P03)
                // and other "object not in prerequisite state", system errors, a
                // transaction already aborted (25P02: a new one will do)
                c if c.starts_with("40")
                    || c.starts_with("53")
                    || c.starts_with("55")
                    || c.starts_with("58")
                    || c.starts_with("25") =>
                {
                    (Storage, Transient)
                }
                // data exceptions (bad value for a column)
                c if c.starts_with("22") => (InvalidInput, Permanent),
                // constraint violations, syntax errors, undefined tables, permissions ...
                _ => (Storage, Permanent),
            }
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => (Unavailable, Transient),
        sqlx::Error::PoolClosed => (Closed, Permanent),
        sqlx::Error::Configuration(_) => (Config, Permanent),
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => (Decode, Permanent),
        _ => (Storage, Transient),
    }
}

/// Map an error met while connecting to `url` (already redacted): names the URL and says
/// what to check.
pub(crate) fn connect_error(url: &str, e: sqlx::Error) -> Error {
    let hint = match classify(&e).0 {
        ErrorKind::Config => "check the user, password and database name in the URL",
        _ => "check that PostgreSQL is running and reachable at that host and port",
    };
    map(format!("cannot connect to PostgreSQL at {url} ({hint})"), e)
}

/// `url` with its password replaced by `***` (in the user-info part and in a `password`
/// query parameter), for logs and errors.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.find(':') {
                Some(colon) => format!("{}:***{host}", &userinfo[..colon]),
                None => authority.to_owned(),
            }
        }
        None => authority.to_owned(),
    };
    let tail = match tail.find('?') {
        Some(q) => {
            let (path, query) = tail.split_at(q + 1);
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://postgres:s3cret@127.0.0.1/test"),
            "postgres://postgres:***@127.0.0.1/test"
        );
        assert_eq!(
            redact_url("postgresql://u:p@ss:w@rd@db:5433/x?sslmode=disable&password=zz"),
            "postgresql://u:***@db:5433/x?sslmode=disable&password=***"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/test"),
            "postgres://postgres@127.0.0.1/test"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }
}
