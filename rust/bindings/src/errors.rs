//! How errors look from Python: the one place where the core's typed
//! errors (`Error`, `BuildError`) become Python exceptions, and where the
//! errors raised in several places are worded once. (An argument refused by
//! one function is raised there, next to its check.)

use pyo3::create_exception;
use pyo3::exceptions::{PyConnectionAbortedError, PyRuntimeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyTuple};
use shardloop_core::{BuildError, Error};

create_exception!(
    shardloop._shardloop,
    ShutdownError,
    PyRuntimeError,
    "The runtime is shutting down: the call was not sent."
);

/// What a call made off a shard is told (the package's Python code raises
/// it too, as `_shardloop.NOT_ON_SHARD`).
const NOT_ON_SHARD: &str = "not running on a shard: start a runtime with \
     shardloop.run(main()) (or asyncio.run(main(), loop_factory=shardloop.new_event_loop)) \
     and call this from code running on it";

/// The Python exception for a failed call between shards.
pub(crate) fn call_error(error: Error) -> PyErr {
    match error {
        Error::NoSuchShard { shard, count } => no_such_shard(shard, count),
        Error::Closed => ShutdownError::new_err(error.to_string()),
        Error::NotOnShard => not_on_shard(),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// The Python exception for a runtime that could not be built: a bad
/// argument is a `ValueError`, a refusal of the system an `OSError`.
pub(crate) fn build_error(error: BuildError) -> PyErr {
    match error {
        BuildError::Io { what, source } => {
            std::io::Error::new(source.kind(), format!("{what}: {source}")).into()
        }
        other => PyValueError::new_err(other.to_string()),
    }
}

/// The error for a shard index outside `0..count`, naming the index given.
pub(crate) fn no_such_shard(shard: impl std::fmt::Display, count: usize) -> PyErr {
    PyValueError::new_err(Error::no_such_shard_message(shard, count))
}

/// The error for calls made outside a running runtime.
pub(crate) fn not_on_shard() -> PyErr {
    PyRuntimeError::new_err(NOT_ON_SHARD)
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

/// A connection used after this side closed it.
pub(crate) fn closed_here() -> PyErr {
    PyConnectionAbortedError::new_err("the connection was closed on this side")
}

/// `asyncio.IncompleteReadError(partial, expected)`: the peer closed before
/// a read had its answer.
pub(crate) fn incomplete_read(
    py: Python<'_>,
    partial: Bound<'_, PyBytes>,
    expected: Option<usize>,
) -> PyErr {
    match (partial, expected).into_pyobject(py) {
        Ok(args) => asyncio_error(py, "IncompleteReadError", args),
        Err(err) => err,
    }
}

/// `asyncio.LimitOverrunError`: a separator not found within `limit` bytes.
pub(crate) fn limit_overrun(py: Python<'_>, limit: usize) -> PyErr {
    let message = format!("the separator was not found within {limit} bytes");
    match (message, limit).into_pyobject(py) {
        Ok(args) => asyncio_error(py, "LimitOverrunError", args),
        Err(err) => err,
    }
}

fn asyncio_error(py: Python<'_>, name: &'static str, args: Bound<'_, PyTuple>) -> PyErr {
    static ASYNCIO: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    let made = ASYNCIO
        .get_or_try_init(py, || py.import("asyncio").map(Bound::unbind))
        .and_then(|asyncio| asyncio.bind(py).getattr(name))
        .and_then(|class| class.call1(args));
    match made {
        Ok(err) => PyErr::from_value(err),
        Err(err) => err,
    }
}

/// Whether `err` is one that stops an event loop rather than a callback
/// (asyncio lets `SystemExit` and `KeyboardInterrupt` through).
pub(crate) fn stops_a_loop(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<pyo3::exceptions::PySystemExit>(py)
        || err.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py)
}

/// The exception object of `err`, carrying its traceback (so the frames of
/// the other shard show where it was raised).
pub(crate) fn exception_with_traceback(
    py: Python<'_>,
    err: PyErr,
) -> Bound<'_, pyo3::exceptions::PyBaseException> {
    let traceback = err.traceback(py);
    let value = err.into_value(py).into_bound(py);
    if let Some(traceback) = traceback {
        let _ = value.setattr(intern!(py, "__traceback__"), traceback);
    }
    value
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ShutdownError", m.py().get_type::<ShutdownError>())?;
    m.add("NOT_ON_SHARD", NOT_ON_SHARD)
}

/// Runs `f` as if inside an `except` block that caught `exc`:
/// `sys.exc_info()` gives `exc` meanwhile, and what was being handled before
/// is restored after.
pub(crate) fn while_handling<R>(
    exc: &Bound<'_, pyo3::exceptions::PyBaseException>,
    f: impl FnOnce() -> R,
) -> R {
    let (mut kind, mut value, mut traceback) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    // SAFETY: called with the GIL held (a `Bound` proves it); the three
    // pointers are valid out-parameters, which receive new references (or
    // NULL) to what the thread is handling now.
    unsafe { pyo3::ffi::PyErr_GetExcInfo(&mut kind, &mut value, &mut traceback) };
    let handled_kind = exc.get_type().into_ptr();
    let handled = exc.clone().into_ptr();
    // SAFETY: with the GIL held; `exc` is a live exception object, and
    // `PyException_GetTraceback` returns a new reference or NULL.
    let handled_traceback = unsafe { pyo3::ffi::PyException_GetTraceback(exc.as_ptr()) };
    // SAFETY: with the GIL held; `PyErr_SetExcInfo` steals the three new
    // references made just above (NULL is allowed for each).
    unsafe { pyo3::ffi::PyErr_SetExcInfo(handled_kind, handled, handled_traceback) };
    let done = f();
    // SAFETY: with the GIL held; steals the references `PyErr_GetExcInfo`
    // gave, restoring what was handled before.
    unsafe { pyo3::ffi::PyErr_SetExcInfo(kind, value, traceback) };
    done
}
