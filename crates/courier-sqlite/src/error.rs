//! The one place where sqlx errors become Courier errors.

use courier_core::{Error, ErrorKind, ErrorStatus};

/// Map a sqlx error, with `what` saying what was being done (and on which file).
pub(crate) fn map(what: impl std::fmt::Display, e: sqlx::Error) -> Error {
    let (kind, status) = match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // SQLITE_BUSY (5), SQLITE_LOCKED (6) and their extended codes are contention.
            let primary = code.parse::<i32>().map(|c| c & 0xff).unwrap_or(0);
            if matches!(primary, 5 | 6) {
                (ErrorKind::Storage, ErrorStatus::Transient)
            } else if matches!(primary, 11 | 26) {
                // SQLITE_CORRUPT, SQLITE_NOTADB
                (ErrorKind::Storage, ErrorStatus::Permanent)
            } else {
                (ErrorKind::Storage, ErrorStatus::Transient)
            }
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => {
            (ErrorKind::Unavailable, ErrorStatus::Transient)
        }
        sqlx::Error::PoolClosed => (ErrorKind::Closed, ErrorStatus::Permanent),
        sqlx::Error::Configuration(_) => (ErrorKind::Config, ErrorStatus::Permanent),
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_) => (ErrorKind::Decode, ErrorStatus::Permanent),
        _ => (ErrorKind::Storage, ErrorStatus::Transient),
    };
    Error::new(kind, format!("{what}: {e}"))
        .with_status(status)
        .with_source(e)
}
