//! The errors a caller of the runtime can see.

use std::any::Any;
use std::fmt;

/// Why a cross-shard call, or building a runtime, failed.
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
    /// The runtime could not be built.
    Build(String),
}

impl Error {
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
            Error::NoSuchShard { shard, count } => write!(
                f,
                "shard {shard} does not exist: valid shards are 0..{count} (0 to {})",
                count.saturating_sub(1)
            ),
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
            Error::Build(why) => write!(f, "cannot build the runtime: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// The result type of cross-shard calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
