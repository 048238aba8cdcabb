//! Step 1 of a call: `submit_to` on the origin shard.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::group::{self, GroupSpec, DEFAULT_GROUP};
use super::{PyCall, Request};
use crate::context;
use crate::errors;
use crate::future::{CallRef, ShardFuture};

/// submit_to(shard_id, fn, /, *args, **kwargs)
/// --
///
/// Runs `fn(*args, **kwargs)` on shard `shard_id`; await the result.
///
/// A coroutine function runs as a task on the target shard and finishes
/// there. The call is sent at once; the returned future resolves on the
/// calling shard. A call to the calling shard itself is queued like any
/// other (no message crosses a ring): it runs when the caller yields, as
/// `loop.call_soon` would run it, after the calls of this turn to other
/// shards have been sent. An exception raised by `fn` is raised here, with its
/// traceback and a note naming the shard. Cancelling the future cancels a
/// remote coroutine on its shard (a plain function already running
/// finishes; its result is dropped).
///
/// Raises ValueError for a shard outside range(count()), ShutdownError once
/// shutdown began, and RuntimeError off a shard; nothing is sent then.
#[pyfunction]
#[pyo3(signature = (shard_id, func, /, *args, **kwargs))]
fn submit_to<'py>(
    py: Python<'py>,
    shard_id: &Bound<'py, PyAny>,
    func: Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
    kwargs: Option<Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    submit(py, &DEFAULT_GROUP, shard_id, func, args, kwargs)
}

/// `submit_to` within `group`'s bound.
pub(crate) fn submit<'py>(
    py: Python<'py>,
    group: &GroupSpec,
    shard_id: &Bound<'py, PyAny>,
    func: Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
    kwargs: Option<Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let shard = context::active().ok_or_else(errors::not_on_shard)?;
    let event_loop = shard.event_loop(py).ok_or_else(errors::not_on_shard)?;
    let target = target_index(shard_id, shard.count)?;
    shardloop_core::embed::check_target(target).map_err(errors::call_error)?;
    let id = shard.next_call();
    // Cancelling the future cancels whatever the call starts as a task
    // there (a coroutine function's coroutine, or one a plain function
    // returns); a call still waiting for room in its group is withdrawn.
    let call = CallRef {
        origin: shard.id,
        target,
        id,
        group: group.id(),
        cancel: cancel_call,
    };
    let future = Bound::new(py, ShardFuture::new(event_loop.unbind(), Some(call)))?;
    let message = PyCall {
        origin: shard.id,
        target,
        id,
        group: Some(group.id()),
        request: Some(Request::Call {
            func: func.unbind(),
            args: args.unbind(),
            kwargs: kwargs.map(Bound::unbind),
        }),
        future: Some(future.clone().unbind()),
        outcome: None,
    };
    // To this shard itself, the core runs the message at once, which parks
    // it in the inbox: it is served when the calling coroutine yields, after
    // this turn's calls to other shards have gone out, and settled like a
    // remote call.
    group::admit(&shard.admission, group, target, Box::new(message))?;
    Ok(future.into_any())
}

/// ServiceGroup(max_inflight, name=None)
/// --
///
/// A bound on the calls in flight from each shard to each other shard:
/// calls sent through the group beyond `max_inflight` to one target wait,
/// unsent and in order, on the calling shard until earlier ones are
/// answered.
#[pyclass(module = "shardloop._shardloop", subclass, frozen)]
pub(crate) struct ServiceGroup {
    spec: GroupSpec,
}

#[pymethods]
impl ServiceGroup {
    #[new]
    #[pyo3(signature = (max_inflight, name = None))]
    fn new(max_inflight: &Bound<'_, PyAny>, name: Option<String>) -> PyResult<Self> {
        if max_inflight.is_instance_of::<pyo3::types::PyBool>()
            || !max_inflight.is_instance_of::<pyo3::types::PyInt>()
        {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "max_inflight must be an int, not {}",
                max_inflight.get_type().name()?
            )));
        }
        let max_inflight = match max_inflight.extract::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "max_inflight must be at least 1, not {max_inflight}"
                )))
            }
        };
        Ok(Self {
            spec: GroupSpec::new(max_inflight, name),
        })
    }

    /// The group's name, as `stats()` reports it.
    #[getter]
    fn name(&self) -> &str {
        self.spec.name()
    }

    /// The most calls of the group in flight from one shard to another.
    #[getter]
    fn max_inflight(&self) -> usize {
        self.spec.max_inflight()
    }

    /// submit_to(shard_id, fn, /, *args, **kwargs)
    /// --
    ///
    /// `shard.submit_to` within this group's bound: the call waits on this
    /// shard, unsent, while `max_inflight` calls of the group to `shard_id`
    /// are in flight.
    #[pyo3(signature = (shard_id, func, /, *args, **kwargs))]
    fn submit_to<'py>(
        &self,
        py: Python<'py>,
        shard_id: &Bound<'py, PyAny>,
        func: Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
        kwargs: Option<Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        submit(py, &self.spec, shard_id, func, args, kwargs)
    }
}

/// check_shard(shard_id, count, /)
/// --
///
/// The index `shard_id` names among `count` shards, with the errors of
/// `submit_to` (`TypeError`, `ValueError`): for callers outside the
/// runtime, which check before they hand a call to it.
#[pyfunction]
#[pyo3(signature = (shard_id, count, /))]
fn check_shard(shard_id: &Bound<'_, PyAny>, count: usize) -> PyResult<usize> {
    target_index(shard_id, count)
}

/// The index `shard_id` names among `count` shards: `TypeError` for what is
/// not an integer, `ValueError` naming it for one out of range.
fn target_index(shard_id: &Bound<'_, PyAny>, count: usize) -> PyResult<usize> {
    let index: Option<i128> = match shard_id.extract::<i128>() {
        Ok(index) => Some(index),
        Err(err) if err.is_instance_of::<pyo3::exceptions::PyOverflowError>(shard_id.py()) => None,
        Err(_) => {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "the shard must be an int, not {}",
                shard_id.get_type().name()?
            )))
        }
    };
    match index.and_then(|i| usize::try_from(i).ok()) {
        Some(index) if index < count => Ok(index),
        _ => Err(errors::no_such_shard(shard_id, count)),
    }
}

/// Sends the cancel of `call` to its shard, or withdraws it if its group
/// still holds it back on this shard. False, doing nothing, when the
/// call's shard is not the one running here (its loop is not running): the
/// cancel is then tried again from the loop.
pub(crate) fn cancel_call(call: CallRef) -> bool {
    let Some(shard) = context::active().filter(|shard| shard.id == call.origin) else {
        return false;
    };
    if group::withdraw(&shard.admission, call.group, call.target, call.id) {
        // It never left: nothing to cancel there.
        return true;
    }
    let cancel = PyCall {
        origin: call.origin,
        target: call.target,
        id: call.id,
        group: None,
        request: Some(Request::Cancel),
        future: None,
        outcome: None,
    };
    // A cancel during shutdown cannot be sent; the call then finishes.
    let _ = shardloop_core::embed::send(call.target, Box::new(cancel));
    true
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(submit_to, m)?)?;
    m.add_function(wrap_pyfunction!(check_shard, m)?)?;
    m.add_class::<ServiceGroup>()?;
    m.add("DEFAULT_MAX_INFLIGHT", group::DEFAULT_MAX_INFLIGHT)
}
