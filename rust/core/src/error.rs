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
    /// The cpuset given names no CPU.
    EmptyCpuset,
    /// The cpuset given names a CPU twice.
    RepeatedCpu {
        /// The CPU named twice.
        cpu: usize,
    },
    /// The cpuset given names CPUs this process may not run on.
    CpusNotAllowed {
        /// The CPUs refused.
        cpus: Vec<usize>,
        /// The CPUs this process may run on.
        allowed: Vec<usize>,
    },
    /// More shards than CPUs in the cpuset given, without overprovisioning.
    CpusetTooSmall {
        /// The number of shards asked for.
        shards: usize,
        /// The number of CPUs in the cpuset.
        cpus: usize,
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
            BuildError::EmptyCpuset => f.write_str("the cpuset names no CPU"),
            BuildError::RepeatedCpu { cpu } => write!(f, "the cpuset names CPU {cpu} twice"),
            BuildError::CpusNotAllowed { cpus, allowed } => write!(
                f,
                "the cpuset names CPU{} {} that this process may not run on (it may run on {})",
                if cpus.len() == 1 { "" } else { "s" },
                cpu_list(cpus),
                cpu_list(allowed),
            ),
            BuildError::CpusetTooSmall { shards, cpus } => write!(
                f,
                "{shards} shards on a cpuset of {cpus} CPU{}: give one CPU per shard, or ask for \
                 overprovisioned shards, which share their CPUs",
                if *cpus == 1 { "" } else { "s" },
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

/// `cpus` as a cpuset list, ranges joined: "0-3,8".
pub(crate) fn cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            sorted[i].to_string()
        } else {
            format!("{}-{}", sorted[i], sorted[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// The result type of cross-shard calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::cpu_list;

    #[test]
    fn cpu_lists_join_ranges() {
        assert_eq!(cpu_list(&[8, 0, 1, 2, 3]), "0-3,8");
        assert_eq!(cpu_list(&[5]), "5");
        assert_eq!(cpu_list(&[]), "");
    }
}
