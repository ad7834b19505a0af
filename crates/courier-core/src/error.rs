//! The one error type of `courier-core`, with a transient / permanent status.

use std::fmt;

/// What went wrong, coarsely: callers branch on this, people read the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Input that can never succeed as given (bad header, bad name, oversized message).
    InvalidInput,
    /// A payload or envelope could not be decoded.
    Decode,
    /// The storage or broker failed; often transient.
    Storage,
    /// A peer (broker, database) could not be reached.
    Unavailable,
    /// This member lost ownership (lease expired, generation moved on).
    Fenced,
    /// A configuration value is wrong.
    Config,
    /// The component was shut down.
    Closed,
    /// A wait ran out of time.
    Timeout,
}

/// Whether retrying the failed operation can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorStatus {
    /// Retrying later may succeed (I/O hiccup, lock contention, broker restart).
    Transient,
    /// Retrying will fail the same way (bad input, wrong configuration).
    Permanent,
}

/// Courier's error: a kind, a status, a message a person can act on, and the source.
pub struct Error {
    kind: ErrorKind,
    status: ErrorStatus,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with Courier's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error; the status defaults from the kind (storage, unavailable, timeout are
    /// transient, everything else permanent).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let status = match kind {
            ErrorKind::Storage | ErrorKind::Unavailable | ErrorKind::Timeout => {
                ErrorStatus::Transient
            }
            _ => ErrorStatus::Permanent,
        };
        Self {
            kind,
            status,
            message: message.into(),
            source: None,
        }
    }

    /// Shorthand for an [`ErrorKind::InvalidInput`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Override the status.
    pub fn with_status(mut self, status: ErrorStatus) -> Self {
        self.status = status;
        self
    }

    /// Prefix the message with context (which channel, which message, which file).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The status.
    pub fn status(&self) -> ErrorStatus {
        self.status
    }

    /// True when retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.status == ErrorStatus::Transient
    }

    /// The human-readable message (without the source chain).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("status", &self.status)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            // Backends often put the source's text in the message already: say it once.
            let text = source.to_string();
            if !self.message.contains(&text) {
                write!(f, " ({text})")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_kind_and_can_be_overridden() {
        assert!(Error::new(ErrorKind::Storage, "x").is_retryable());
        assert!(!Error::invalid("x").is_retryable());
        let e = Error::invalid("x").with_status(ErrorStatus::Transient);
        assert!(e.is_retryable());
    }

    #[test]
    fn context_prefixes_message() {
        let e = Error::invalid("bad header").context("channel orders");
        assert_eq!(e.to_string(), "channel orders: bad header");
    }

    #[test]
    fn the_source_is_shown_once() {
        let io = || std::io::Error::other("connection refused");
        let e = Error::new(ErrorKind::Unavailable, "cannot connect").with_source(io());
        assert_eq!(e.to_string(), "cannot connect (connection refused)");
        let e = Error::new(ErrorKind::Unavailable, "cannot connect: connection refused")
            .with_source(io());
        assert_eq!(e.to_string(), "cannot connect: connection refused");
    }
}
