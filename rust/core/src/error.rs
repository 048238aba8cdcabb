//! The errors a caller of the runtime can see, one type per operation:
//! [`Error`] for a call between shards, [`BuildError`] for building a
//! runtime.

use std::any::Any;
use std::fmt;
use std::io;

/// Why a cross-shard call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The shard index is outside `0..count`; nothing was sent.
    NoSuchShard {
        /// The index the caller gave.
        shard: usize,
        /// The number of shards in the runtime.
        count: usize,
    },
    /// The runtime has begun shutting down; nothing was sent.
    Closed,
    /// The call was made on a thread that is not a shard of a running runtime.
    NotOnShard,
    /// The submitted closure (or the future it returned) panicked on `shard`;
    /// the shard itself kept serving.
    Panicked {
        /// The shard the closure ran on.
        shard: usize,
        /// The panic payload, if it was a string.
        message: String,
    },
}

impl Error {
    /// The wording of [`Error::NoSuchShard`] for a shard named any way (an
    /// embedder's index may be negative, or too large for a `usize`).
    pub fn no_such_shard_message(shard: impl fmt::Display, count: usize) -> String {
        format!(
            "shard {shard} does not exist: the runtime has {count} shard{}, 0 to {}",
            if count == 1 { "" } else { "s" },
            count.saturating_sub(1)
        )
    }

    pub(crate) fn from_panic(shard: usize, payload: Box<dyn Any + Send>) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "non-string panic payload".to_owned()
        };
        Error::Panicked { shard, message }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoSuchShard { shard, count } => {
                f.write_str(&Error::no_such_shard_message(shard, *count))
            }
            Error::Closed => f.write_str("the runtime is shutting down; the call was not sent"),
            Error::NotOnShard => f.write_str(
                "not on a shard: call this from a future run by Runtime::block_on or on a shard",
            ),
            Error::Panicked { shard, message } => {
                write!(
                    f,
                    "the submitted closure panicked on shard {shard}: {message}"
                )
            }
        }
    }
}

impl std::error::Error for Error {}

/// Why a runtime could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// Zero shards were asked for.
    NoShards,
    /// More shards than [`MAX_SHARDS`](crate::MAX_SHARDS) were asked for.
    TooManyShards {
        /// The number asked for.
        shards: usize,
        /// The most a runtime may have.
        max: usize,
    },
    /// The operating system refused a resource a shard needs.
    Io {
        /// What was being done.
        what: &'static str,
        /// What the system said.
        source: io::Error,
    },
}

impl BuildError {
    /// For `map_err`: an [`Io`](Self::Io) error while doing `what`.
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| BuildError::Io { what, source }
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::NoShards => f.write_str("a runtime needs at least one shard"),
            BuildError::TooManyShards { shards, max } => write!(
                f,
                "{shards} shards: a runtime has at most {max} (every ordered pair of shards has \
                 two rings, so their number grows with the square of the shards)"
            ),
            BuildError::Io { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BuildError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The result type of cross-shard calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
