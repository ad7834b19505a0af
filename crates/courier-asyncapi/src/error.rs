//! The crate's error.

use std::path::PathBuf;

/// What went wrong reading, parsing or writing a document.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A document file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A text is neither YAML nor JSON, or not the expected document.
    #[error("{origin} is not {expected}: {message}")]
    Parse {
        /// Where the text came from (a file name, `stdin`, ...).
        origin: String,
        /// What it should have been, e.g. `an AsyncAPI 3 document`.
        expected: &'static str,
        /// What is wrong, with the parser's position when it gave one.
        message: String,
    },
    /// A document could not be written.
    #[error("cannot write the document as {format}: {message}")]
    Write {
        /// `YAML` or `JSON`.
        format: &'static str,
        /// The serializer's message.
        message: String,
    },
}

impl Error {
    /// Whether trying again may help: only for reads interrupted or timed out. A missing
    /// file or a malformed document stays so until a person fixes it.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Read { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            Self::Parse { .. } | Self::Write { .. } => false,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
