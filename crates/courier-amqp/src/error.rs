//! The one place where lapin errors become Courier errors, and URL redaction.

use courier_core::{Error, ErrorKind, ErrorStatus};
use lapin::ErrorKind as LapinKind;
use std::fmt;

/// AMQP reply codes Courier branches on.
pub(crate) mod code {
    /// The broker closed the connection (e.g. `rabbitmqctl close_connection`, shutdown).
    pub(crate) const CONNECTION_FORCED: u16 = 320;
    /// The message is larger than the broker's `max_message_size`.
    pub(crate) const CONTENT_TOO_LARGE: u16 = 311;
    /// Wrong credentials or no permission on the resource.
    pub(crate) const ACCESS_REFUSED: u16 = 403;
    /// The queue or exchange does not exist.
    pub(crate) const NOT_FOUND: u16 = 404;
    /// An exclusive queue is owned by another connection (our partition locks).
    pub(crate) const RESOURCE_LOCKED: u16 = 405;
    /// A redeclaration with other arguments (e.g. another partition count).
    pub(crate) const PRECONDITION_FAILED: u16 = 406;
    /// The vhost does not exist or the user may not use it.
    pub(crate) const NOT_ALLOWED: u16 = 530;
}

/// The AMQP reply code and text of a protocol error, if `e` is one.
pub(crate) fn reply(e: &lapin::Error) -> Option<(u16, String)> {
    match e.kind() {
        LapinKind::ProtocolError(p) => Some((p.get_id(), p.get_message().to_string())),
        _ => None,
    }
}

/// True when `e` is the AMQP reply `code`.
pub(crate) fn is(e: &lapin::Error, code: u16) -> bool {
    reply(e).is_some_and(|(c, _)| c == code)
}

/// Map a lapin error, with `what` saying what was being done (which channel, message,
/// URL). Broken connections, timeouts and missing resources are transient (reconnecting
/// or recreating helps); refused credentials, inequivalent declarations and oversized
/// messages are permanent.
pub(crate) fn map(what: impl fmt::Display, e: lapin::Error) -> Error {
    let (kind, status) = classify(&e);
    Error::new(kind, format!("{what}: {e}"))
        .with_status(status)
        .with_source(e)
}

fn classify(e: &lapin::Error) -> (ErrorKind, ErrorStatus) {
    use ErrorStatus::{Permanent, Transient};
    match e.kind() {
        LapinKind::IOError(_)
        | LapinKind::MissingHeartbeatError
        | LapinKind::InvalidChannel(_)
        | LapinKind::InvalidChannelState(..)
        | LapinKind::InvalidConnectionState(_)
        | LapinKind::FutureCompleted
        | LapinKind::ParsingError(_) => (ErrorKind::Unavailable, Transient),
        LapinKind::ChannelsLimitReached => (ErrorKind::Storage, Transient),
        LapinKind::ProtocolError(p) => by_code(p.get_id()),
        LapinKind::AuthProviderError(_) | LapinKind::InvalidProtocolVersion(_) => {
            (ErrorKind::Config, Permanent)
        }
        LapinKind::RuntimeShutdownError(_) => (ErrorKind::Closed, Permanent),
        LapinKind::SerialisationError(_) | LapinKind::NoDefaultRuntime => {
            (ErrorKind::Config, Permanent)
        }
        _ => (ErrorKind::Storage, Transient),
    }
}

fn by_code(reply: u16) -> (ErrorKind, ErrorStatus) {
    use ErrorStatus::{Permanent, Transient};
    match reply {
        code::ACCESS_REFUSED | code::NOT_ALLOWED | code::PRECONDITION_FAILED => {
            (ErrorKind::Config, Permanent)
        }
        code::CONTENT_TOO_LARGE => (ErrorKind::InvalidInput, Permanent),
        code::RESOURCE_LOCKED => (ErrorKind::Fenced, Transient),
        code::CONNECTION_FORCED => (ErrorKind::Unavailable, Transient),
        // Not found (deleted concurrently, recreated on the next try), resource errors,
        // internal errors, frame errors: the broker may recover.
        _ => (ErrorKind::Storage, Transient),
    }
}

/// `url` with the user info (user name and password) replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_owned(),
    };
    match scheme {
        Some(s) => format!("{s}://{authority}{path}"),
        None => format!("{authority}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_user_info_only() {
        assert_eq!(
            redact("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://h:1/v?x=a@b"), "amqp://h:1/v?x=a@b");
        assert_eq!(redact("amqp://a:b@c@h/v"), "amqp://***@h/v");
        assert_eq!(redact("127.0.0.1:5672"), "127.0.0.1:5672");
    }

    #[test]
    fn codes_classify() {
        assert_eq!(by_code(code::ACCESS_REFUSED).1, ErrorStatus::Permanent);
        assert_eq!(by_code(code::PRECONDITION_FAILED).0, ErrorKind::Config);
        assert_eq!(by_code(code::RESOURCE_LOCKED).0, ErrorKind::Fenced);
        assert_eq!(by_code(code::CONNECTION_FORCED).1, ErrorStatus::Transient);
        assert_eq!(by_code(code::NOT_FOUND).1, ErrorStatus::Transient);
        assert_eq!(by_code(541).1, ErrorStatus::Transient);
    }
}
