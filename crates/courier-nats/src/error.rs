//! The one place where async-nats errors become Courier errors.

use courier_core::{Error, ErrorKind, ErrorStatus};
use std::fmt;

/// Map an async-nats error, with `what` saying what was being done (and on which channel).
///
/// async-nats has one error kind enum per operation (publish, create stream, fetch, KV
/// update, ...); they share variant names, so the kind's name decides: timeouts and
/// broken connections are transient, invalid names and conflicting configurations are
/// permanent, everything else is treated as a transient broker failure.
pub(crate) fn map<K>(what: impl fmt::Display, e: async_nats::error::Error<K>) -> Error
where
    K: Clone + fmt::Debug + fmt::Display + PartialEq + Send + Sync + 'static,
{
    let kind_name = format!("{:?}", e.kind());
    let (kind, status) = classify(&kind_name);
    Error::new(kind, format!("{what}: {e}"))
        .with_status(status)
        .with_source(e)
}

/// Map the boxed error of an acknowledgement (async-nats gives no kind there): the
/// connection failed, so it is transient.
pub(crate) fn map_boxed(what: impl fmt::Display, e: async_nats::Error) -> Error {
    let text = e.to_string();
    let kind = if text.contains("timed out") {
        ErrorKind::Timeout
    } else {
        ErrorKind::Unavailable
    };
    Error::new(kind, format!("{what}: {text}")).with_status(ErrorStatus::Transient)
}

fn classify(kind: &str) -> (ErrorKind, ErrorStatus) {
    let has = |s: &str| kind.contains(s);
    if has("TimedOut") {
        (ErrorKind::Timeout, ErrorStatus::Transient)
    } else if has("BrokenPipe")
        || has("Disconnected")
        || has("NoResponders")
        || has("Io")
        || has("MaxReconnects")
        || has("Dns")
    {
        (ErrorKind::Unavailable, ErrorStatus::Transient)
    } else if has("Invalid")
        || has("Authentication")
        || has("Authorization")
        || has("Tls")
        || has("ServerParse")
        || has("JetStreamUnavailable")
    {
        (ErrorKind::Config, ErrorStatus::Permanent)
    } else {
        (ErrorKind::Storage, ErrorStatus::Transient)
    }
}

/// `url` with any user name, password or token replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let mut out = Vec::new();
    for one in url.split(',') {
        let one = one.trim();
        let (scheme, rest) = match one.split_once("://") {
            Some((s, r)) => (Some(s), r),
            None => (None, one),
        };
        let rest = match rest.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => rest.to_owned(),
        };
        out.push(match scheme {
            Some(s) => format!("{s}://{rest}"),
            None => rest,
        });
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact("nats://alice:s3cret@host:4222"),
            "nats://***@host:4222"
        );
        assert_eq!(
            redact("nats://tok@h:1,nats://h2:2"),
            "nats://***@h:1,nats://h2:2"
        );
        assert_eq!(redact("127.0.0.1:4222"), "127.0.0.1:4222");
    }

    #[test]
    fn classification() {
        assert_eq!(classify("TimedOut").0, ErrorKind::Timeout);
        assert!(matches!(classify("BrokenPipe").1, ErrorStatus::Transient));
        assert_eq!(classify("InvalidStreamName").1, ErrorStatus::Permanent);
        assert_eq!(classify("Other").0, ErrorKind::Storage);
    }
}
