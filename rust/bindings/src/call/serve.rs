//! Step 2 of a call: serving it on its target. The core runs a [`PyCall`]
//! message without the GIL, so running it only parks it in the thread's
//! inbox (and an answered call coming back is parked the same way); the
//! driver then hands each request, with the GIL, to [`serve`].

use pyo3::exceptions::asyncio::CancelledError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::{CallKey, PyCall, Request};
use crate::context::{self, Incoming, Shard};
use crate::errors;

impl shardloop_core::embed::Message for PyCall {
    fn run(self: Box<Self>) {
        context::arrive(Incoming::Request(self));
    }

    fn complete(self: Box<Self>) {
        context::arrive(Incoming::Answered(self));
    }
}

fn call_key(origin: usize, id: u64) -> CallKey {
    (shardloop_core::runtime_id().unwrap_or(0), origin, id)
}

/// Sends the call back to its origin.
fn answer(call: Box<PyCall>) {
    let origin = call.origin;
    shardloop_core::embed::respond(origin, call);
}

/// What calling a function gave: its outcome, or a coroutine to run as a
/// task.
enum Served<'py> {
    Outcome(PyResult<Py<PyAny>>),
    Coroutine(Bound<'py, PyAny>),
}

/// Calls `func(*args, **kwargs)`.
fn invoke<'py>(
    func: &Bound<'py, PyAny>,
    args: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> Served<'py> {
    match func.call(args, kwargs) {
        Ok(value) if is_coroutine(func.py(), &value) => Served::Coroutine(value),
        other => Served::Outcome(other.map(Bound::unbind)),
    }
}

/// Serves one request; returns whether it started a task on the event loop.
/// A `SystemExit` or `KeyboardInterrupt` the function raises goes to its
/// caller and is kept in `fatal`, to stop this loop too.
pub(crate) fn serve(
    py: Python<'_>,
    event_loop: &Bound<'_, PyAny>,
    shard: &Shard,
    mut call: Box<PyCall>,
    fatal: &mut Option<PyErr>,
) -> PyResult<bool> {
    match call.request.take() {
        Some(Request::Call { func, args, kwargs }) => {
            shard.serving(Some(&func), py);
            let served = invoke(
                func.bind(py),
                args.bind(py),
                kwargs.as_ref().map(|k| k.bind(py)),
            );
            shard.serving(None, py);
            // The callable and its arguments are released here, on the
            // target, where they were used.
            drop((func, args, kwargs));
            match served {
                Served::Coroutine(coroutine) => {
                    return start_task(py, event_loop, shard, call, coroutine, fatal)
                }
                Served::Outcome(Err(err)) if errors::stops_a_loop(py, &err) => {
                    // The caller gets it, and it stops this loop too.
                    fatal.get_or_insert_with(|| err.clone_ref(py));
                    call.outcome = Some(Err(err));
                    answer(call);
                }
                Served::Outcome(outcome) => {
                    call.outcome = Some(outcome);
                    answer(call);
                }
            }
        }
        Some(Request::Cancel) => {
            let task = context::with(|c| {
                c.running
                    .borrow()
                    .get(&call_key(call.origin, call.id))
                    .map(|t| t.clone_ref(py))
            });
            answer(call);
            if let Some(task) = task {
                task.bind(py).call_method0(intern!(py, "cancel"))?;
            }
        }
        None => answer(call),
    }
    Ok(false)
}

/// Runs the coroutine a call produced as a task of this shard, which
/// answers the call when it is done; cancellable from the caller. Where
/// asyncio has eager tasks (3.12+) and the loop has no task factory of its
/// own, the task starts eagerly: its first step runs here, and a coroutine
/// that finishes without waiting is answered at once, without a turn of
/// the loop. Returns whether the task is left for the loop to run.
fn start_task(
    py: Python<'_>,
    event_loop: &Bound<'_, PyAny>,
    shard: &Shard,
    mut call: Box<PyCall>,
    coroutine: Bound<'_, PyAny>,
    fatal: &mut Option<PyErr>,
) -> PyResult<bool> {
    shard.serving(Some(coroutine.as_unbound()), py);
    let created = create_task(py, event_loop, &coroutine);
    shard.serving(None, py);
    let task = match created {
        Ok(task) => task,
        Err(err) => {
            // The loop refused it (closed, say), or its eager first step let
            // a SystemExit or KeyboardInterrupt through: the caller gets the
            // error, and the coroutine is closed rather than never awaited.
            let _ = coroutine.call_method0(intern!(py, "close"));
            if errors::stops_a_loop(py, &err) {
                fatal.get_or_insert_with(|| err.clone_ref(py));
            }
            call.outcome = Some(Err(err));
            answer(call);
            return Ok(false);
        }
    };
    if task.call_method0(intern!(py, "done"))?.is_truthy()? {
        call.outcome = Some(task_outcome(py, &task)?);
        answer(call);
        return Ok(false);
    }
    let key = call_key(call.origin, call.id);
    let responder = Bound::new(
        py,
        Responder {
            call: std::sync::Mutex::new(Some(call)),
        },
    )?;
    task.call_method1(intern!(py, "add_done_callback"), (responder,))?;
    let replaced = context::with(|c| c.running.borrow_mut().insert(key, task.unbind()));
    drop(replaced);
    Ok(true)
}

/// A task of `coroutine` on `event_loop`: an eager one where asyncio has
/// them and the loop makes its tasks itself.
fn create_task<'py>(
    py: Python<'py>,
    event_loop: &Bound<'py, PyAny>,
    coroutine: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    static EAGER_TASK: pyo3::sync::PyOnceLock<Option<Py<PyAny>>> = pyo3::sync::PyOnceLock::new();
    let eager = EAGER_TASK.get_or_init(py, || {
        if py.version_info() < (3, 12) {
            return None;
        }
        py.import("asyncio")
            .and_then(|asyncio| asyncio.getattr("Task"))
            .ok()
            .map(Bound::unbind)
    });
    let own_factory = event_loop
        .getattr(intern!(py, "_task_factory"))
        .map_or(true, |factory| !factory.is_none());
    match eager {
        Some(task_type) if !own_factory => {
            let kwargs = pyo3::types::PyDict::new(py);
            kwargs.set_item(intern!(py, "loop"), event_loop)?;
            kwargs.set_item(intern!(py, "eager_start"), true)?;
            task_type.bind(py).call((coroutine,), Some(&kwargs))
        }
        _ => event_loop.call_method1(intern!(py, "create_task"), (coroutine,)),
    }
}

/// The outcome of a done task that ran a call.
fn task_outcome(py: Python<'_>, task: &Bound<'_, PyAny>) -> PyResult<PyResult<Py<PyAny>>> {
    if task.call_method0(intern!(py, "cancelled"))?.is_truthy()? {
        return Ok(Err(CancelledError::new_err(
            "the call was cancelled on its shard",
        )));
    }
    Ok(match task.call_method0(intern!(py, "exception"))? {
        exc if exc.is_none() => Ok(task.call_method0(intern!(py, "result"))?.unbind()),
        exc => Err(PyErr::from_value(exc)),
    })
}

/// Whether a call's result is a coroutine, to be run as a task. Only real
/// coroutines are: a generator or another awaitable a plain function
/// returns comes back as it is. Most results have no `__await__` at all,
/// which one look at their type tells.
fn is_coroutine(py: Python<'_>, value: &Bound<'_, PyAny>) -> bool {
    // SAFETY: `value` is a live object (we hold a reference), so its type
    // object is too; the checks read type fields only.
    unsafe {
        let object = value.as_ptr();
        if pyo3::ffi::PyCoro_CheckExact(object) != 0 {
            return true;
        }
        let async_slots = (*pyo3::ffi::Py_TYPE(object)).tp_as_async;
        if async_slots.is_null() || (*async_slots).am_await.is_none() {
            return false;
        }
    }
    static COROUTINE: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
    COROUTINE
        .import(py, "collections.abc", "Coroutine")
        .and_then(|coroutine| value.is_instance(coroutine))
        .unwrap_or(false)
}

/// Done-callback of a task that runs a call for another shard: answers the
/// call with the task's outcome. Runs on its shard; may be dropped anywhere
/// (a task that never finished is collected wherever its loop goes), so it
/// holds the call behind a lock rather than being tied to its thread.
#[pyclass(frozen)]
struct Responder {
    call: std::sync::Mutex<Option<Box<PyCall>>>,
}

#[pymethods]
impl Responder {
    fn __call__(&self, py: Python<'_>, task: &Bound<'_, PyAny>) -> PyResult<()> {
        let taken = self
            .call
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(mut call) = taken else {
            return Ok(());
        };
        let key = call_key(call.origin, call.id);
        let finished = context::with(|c| c.running.borrow_mut().remove(&key));
        drop(finished);
        call.outcome = Some(task_outcome(py, task)?);
        answer(call);
        Ok(())
    }
}

/// call_tasks()
/// --
///
/// The tasks of this shard that run calls from other shards (a
/// shutting-down runtime gives them a grace period, and cancels the rest).
#[pyfunction]
fn call_tasks(py: Python<'_>) -> Vec<Py<PyAny>> {
    let runtime = shardloop_core::runtime_id().unwrap_or(0);
    context::with(|c| {
        c.running
            .borrow()
            .iter()
            .filter(|(key, _)| key.0 == runtime)
            .map(|(_, task)| task.clone_ref(py))
            .collect()
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(call_tasks, m)?)
}
