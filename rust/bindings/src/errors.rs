//! How the runtime's errors look from Python.

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use shardloop_core::Error;

create_exception!(
    shardloop._shardloop,
    ShutdownError,
    PyRuntimeError,
    "The runtime is shutting down: the call was not sent."
);

/// The Python exception for a runtime error.
pub(crate) fn to_py(error: Error) -> PyErr {
    match error {
        Error::NoSuchShard { shard, count } => no_such_shard(shard, count),
        Error::Closed => ShutdownError::new_err(error.to_string()),
        Error::NotOnShard => not_on_shard(),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// The error for a shard index outside `0..count`, naming the index given.
pub(crate) fn no_such_shard(shard: impl std::fmt::Display, count: usize) -> PyErr {
    PyValueError::new_err(format!(
        "shard {shard} does not exist: valid shards are 0..{count} (0 to {})",
        count.saturating_sub(1)
    ))
}

/// `seconds` as a `Duration`: `ValueError` naming `what` for a negative,
/// NaN or too large number (a Rust `Duration` would panic on it).
pub(crate) fn duration(what: &str, seconds: f64) -> PyResult<std::time::Duration> {
    if seconds < 0.0 {
        return Err(PyValueError::new_err(format!(
            "{what} must be at least 0 seconds, not {seconds}"
        )));
    }
    std::time::Duration::try_from_secs_f64(seconds)
        .map_err(|_| PyValueError::new_err(format!("{what} is out of range: {seconds} seconds")))
}

/// The error for calls made outside a running runtime.
pub(crate) fn not_on_shard() -> PyErr {
    PyRuntimeError::new_err(
        "not running on a shard: start a runtime with shardloop.run(main()) and call this \
         from main() or from code it runs on a shard",
    )
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ShutdownError", m.py().get_type::<ShutdownError>())
}
