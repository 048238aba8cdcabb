//! Step 3 of a call: completing the caller's asyncio future on its own
//! shard, with the answer of a call or of a call served here. (The driver
//! settles the futures of Rust tasks with the same [`settle`].)

use pyo3::exceptions::asyncio::CancelledError;
use pyo3::intern;
use pyo3::prelude::*;

use super::PyCall;

/// Settles the caller's future with the answer of its call.
pub(crate) fn settle_answered(py: Python<'_>, mut call: PyCall) -> PyResult<()> {
    let (Some(future), Some(outcome)) = (call.future.take(), call.outcome.take()) else {
        return Ok(());
    };
    let future = future.bind(py);
    if let Some(hook) = call.hook.take() {
        // Answered: nothing is left to cancel, and a callback that is not
        // there costs no turn of the loop.
        future.call_method1(intern!(py, "remove_done_callback"), (hook,))?;
    }
    settle(py, future, outcome, Some(call.target))
}

/// Completes an asyncio future with `outcome`, unless it is done already (a
/// caller that gave up: the outcome is dropped here). An error raised on
/// shard `shard` gets a note naming it; a `StopIteration`, which a future
/// cannot hold, reaches the caller as asyncio hands it over from a task: a
/// `RuntimeError` caused by it.
pub(crate) fn settle(
    py: Python<'_>,
    future: &Bound<'_, PyAny>,
    outcome: PyResult<Py<PyAny>>,
    shard: Option<usize>,
) -> PyResult<()> {
    if future.call_method0(intern!(py, "done"))?.is_truthy()? {
        return Ok(());
    }
    match outcome {
        Ok(value) => {
            future.call_method1(intern!(py, "set_result"), (value,))?;
        }
        Err(err) if err.is_instance_of::<CancelledError>(py) => {
            future.call_method0(intern!(py, "cancel"))?;
        }
        Err(err) => {
            let err = deliverable(py, err);
            if let Some(shard) = shard {
                // PEP 678; an exception whose `__notes__` is not a list
                // keeps its own: the exception matters more than the note.
                let _ = err.add_note(py, format!("raised on shard {shard}"));
            }
            future.call_method1(
                intern!(py, "set_exception"),
                (exception_with_traceback(py, err),),
            )?;
        }
    }
    Ok(())
}

/// `err`, or for a `StopIteration` (which asyncio futures refuse) a
/// `RuntimeError` caused by it.
fn deliverable(py: Python<'_>, err: PyErr) -> PyErr {
    if !err.is_instance_of::<pyo3::exceptions::PyStopIteration>(py) {
        return err;
    }
    let wrapped =
        pyo3::exceptions::PyRuntimeError::new_err("the called function raised StopIteration");
    wrapped.set_cause(py, Some(err));
    wrapped
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
