//! Typed errors of the crate.

use std::path::PathBuf;

/// Everything that can go wrong in `mmada-wandb`.
///
/// No variant ever carries the API key: HTTP errors carry the operation, the status and a short,
/// truncated excerpt of the server's reply only.
#[derive(Debug, thiserror::Error)]
pub enum WandbError {
    /// A field of [`crate::WandbConfig`] has an invalid value; `key` is the field name as written
    /// in the recipe (under `logging.wandb`).
    #[error("invalid wandb config key `{key}`: {reason}")]
    InvalidConfig {
        /// The offending key, e.g. `flush_interval_secs`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Online mode was requested but no API key was found in `WANDB_API_KEY` or `~/.netrc`.
    #[error(
        "no wandb API key: set WANDB_API_KEY or add the host `{host}` to ~/.netrc (or use mode: offline)"
    )]
    MissingApiKey {
        /// The host the key was looked up for.
        host: String,
    },
    /// The base URL could not be used.
    #[error("invalid wandb base URL `{url}`: {reason}")]
    InvalidBaseUrl {
        /// The URL as given.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A file in the run directory could not be read or written.
    #[error("wandb I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("could not build the HTTP client: {0}")]
    Client(String),
    /// A request failed with an error that is not retried (e.g. 401, 403, 404, a GraphQL error).
    #[error("wandb {op} failed{}: {message}", status.map(|s| format!(" with HTTP {s}")).unwrap_or_default())]
    Rejected {
        /// The operation (`UpsertBucket`, `file_stream`, ...).
        op: String,
        /// The HTTP status, if there was a reply.
        status: Option<u16>,
        /// A short excerpt of the reply or the transport error.
        message: String,
    },
    /// A request still failed after all allowed retries (server errors, rate limits, network).
    #[error("wandb {op} still failing after {attempts} attempts: {message}")]
    RetriesExhausted {
        /// The operation.
        op: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last failure.
        message: String,
    },
    /// The server answered 2xx with a body that lacks what the protocol needs.
    #[error("unexpected wandb reply to {op}: {message}")]
    Protocol {
        /// The operation.
        op: String,
        /// What was missing.
        message: String,
    },
}

impl WandbError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WandbError::Io {
            path: path.into(),
            source,
        }
    }
}
