//! Step 3 of a call: completing the caller's future (a `ShardFuture`) on
//! its own shard, with the answer of a call or of a call served here. (The
//! driver settles the futures of Rust tasks and of a `Connection`'s reads
//! with the same [`settle`].)

use pyo3::exceptions::asyncio::CancelledError;
use pyo3::prelude::*;

use super::PyCall;
use crate::future::{Ready, ShardFuture};

/// Settles the caller's future with the answer of its call; returns its
/// done-callbacks, which resume whoever awaits it (see
/// `ShardFuture::settle`).
pub(crate) fn settle_answered(py: Python<'_>, mut call: PyCall) -> Option<Ready> {
    let (Some(future), Some(outcome)) = (call.future.take(), call.outcome.take()) else {
        return None;
    };
    settle(py, future.bind(py), outcome, Some(call.target))
}

/// Settles `future` with `outcome`, unless it is done already (a caller
/// that gave up: the outcome is dropped here); returns its done-callbacks.
/// An error raised on shard `shard` gets a note naming it; a
/// `StopIteration`, which a future cannot hold, reaches the caller as
/// asyncio hands it over from a task: a `RuntimeError` caused by it.
pub(crate) fn settle(
    py: Python<'_>,
    future: &Bound<'_, ShardFuture>,
    outcome: PyResult<Py<PyAny>>,
    shard: Option<usize>,
) -> Option<Ready> {
    if ShardFuture::is_done(future) {
        return None;
    }
    ShardFuture::settle(future, deliverable(py, outcome, shard))
}

/// `outcome` as a future may hold it: an error raised on shard `shard`
/// gets a note naming it, and a `StopIteration` (which a future cannot
/// hold) becomes a `RuntimeError` caused by it.
fn deliverable(
    py: Python<'_>,
    outcome: PyResult<Py<PyAny>>,
    shard: Option<usize>,
) -> PyResult<Py<PyAny>> {
    let err = match outcome {
        Ok(value) => return Ok(value),
        Err(err) if err.is_instance_of::<CancelledError>(py) => return Err(err),
        Err(err) if err.is_instance_of::<pyo3::exceptions::PyStopIteration>(py) => {
            let wrapped = pyo3::exceptions::PyRuntimeError::new_err(
                "the called function raised StopIteration",
            );
            wrapped.set_cause(py, Some(err));
            wrapped
        }
        Err(err) => err,
    };
    if let Some(shard) = shard {
        // PEP 678; an exception whose `__notes__` is not a list keeps its
        // own: the exception matters more than the note.
        let _ = err.add_note(py, format!("raised on shard {shard}"));
    }
    Err(err)
}
