//! Python calls between shards.
//!
//! A call is a [`PyCall`] message. On the target its `run` only parks it in
//! this thread's inbox and tells the driver (the shard's poll loop runs
//! without the GIL); the shard's event loop then runs the inbox with the GIL
//! held ([`run_incoming`]): a plain function's result goes straight back, a
//! coroutine becomes a task of the target's loop and answers when it is done.
//! Back on the origin, `complete` parks the call in the inbox too, and
//! `run_incoming` resolves the caller's asyncio future on its own loop, so
//! no `call_soon_threadsafe` is involved anywhere.

use std::cell::RefCell;
use std::collections::HashMap;

use pyo3::exceptions::asyncio::CancelledError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// Names a call on its target: the runtime, the origin shard, the call id.
type CallKey = (u64, usize, u64);

fn call_key(origin: usize, id: u64) -> CallKey {
    (shardloop_core::runtime_id().unwrap_or(0), origin, id)
}

/// What a message asks of its target.
pub(crate) enum Request {
    /// Call `func(*args, **kwargs)`.
    Call {
        func: Py<PyAny>,
        args: Py<PyTuple>,
        kwargs: Option<Py<PyDict>>,
    },
    /// Cancel the task running call `id` of the origin.
    Cancel { id: u64 },
}

pub(crate) struct PyCall {
    pub(crate) origin: usize,
    pub(crate) target: usize,
    pub(crate) id: u64,
    /// Taken, and dropped, on the target.
    pub(crate) request: Option<Request>,
    /// The caller's future; only touched on the origin.
    pub(crate) future: Option<Py<PyAny>>,
    /// The future's done-callback that sends the cancel (see
    /// [`CancelOnDone`]); taken off the future when the answer comes.
    pub(crate) hook: Option<Py<PyAny>>,
    /// Written on the target, read on the origin.
    pub(crate) outcome: Option<PyResult<Py<PyAny>>>,
}

/// Makes a Python value (or error) from the output of a Rust task.
pub(crate) type Produce = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

enum Incoming {
    Request(Box<PyCall>),
    Returned(Box<PyCall>),
    /// A Rust task finished: resolve `future` with what `produce` makes.
    Resolve {
        future: Py<PyAny>,
        produce: Produce,
    },
}

thread_local! {
    /// Messages that arrived while the poll loop ran without the GIL.
    static INBOX: RefCell<Vec<Incoming>> = const { RefCell::new(Vec::new()) };
    /// Tasks running calls for other shards, by (runtime, origin, id), so a
    /// caller's cancellation can reach them (call ids are counted per
    /// shard, and a thread may run shards of several runtimes in turn).
    static RUNNING: RefCell<HashMap<CallKey, Py<PyAny>>> = RefCell::new(HashMap::new());
}

impl shardloop_core::Message for PyCall {
    fn run(self: Box<Self>) {
        INBOX.with(|inbox| inbox.borrow_mut().push(Incoming::Request(self)));
        shardloop_core::wake_driver();
    }

    fn complete(self: Box<Self>) {
        INBOX.with(|inbox| inbox.borrow_mut().push(Incoming::Returned(self)));
        shardloop_core::wake_driver();
    }
}

/// Resolves `future` (an asyncio future of this shard) from the shard's
/// loop, with the GIL, at its next look at the inbox.
pub(crate) fn resolve_later(future: Py<PyAny>, produce: Produce) {
    if shardloop_core::shard_id().is_none() {
        // No shard runs here any more (a connection closed after its
        // runtime): nothing will look, and nothing may carry over to the
        // next runtime of this thread.
        return;
    }
    INBOX.with(|inbox| {
        inbox
            .borrow_mut()
            .push(Incoming::Resolve { future, produce })
    });
    shardloop_core::wake_driver();
}

/// Sends the call back to its origin.
fn answer(call: Box<PyCall>) {
    let origin = call.origin;
    shardloop_core::respond(origin, call);
}

/// Drops what this thread's shards left behind (their loops have stopped
/// for good): nothing carries over to the next runtime of this thread.
pub(crate) fn forget_thread_state() {
    let inbox = INBOX.with(|inbox| std::mem::take(&mut *inbox.borrow_mut()));
    let running = RUNNING.with(|running| std::mem::take(&mut *running.borrow_mut()));
    drop((inbox, running));
}

/// Whether messages wait for [`run_incoming`].
pub(crate) fn has_incoming() -> bool {
    INBOX.with(|inbox| !inbox.borrow().is_empty())
}

/// Runs every request and resolves every returned call that arrived on this
/// shard; `event_loop` is the shard's asyncio loop. Returns how many there
/// were, and whether any of them left work for the event loop (a task
/// started or a future resolved) rather than only answering plain calls.
///
/// Nothing a user's code raises escapes from here but what stops a loop: a
/// call's exception goes to its caller, and a failure to deliver one (a
/// future that refuses its outcome, say) goes to the loop's exception
/// handler, as asyncio reports errors of callbacks. A `SystemExit` or
/// `KeyboardInterrupt` (raised by a served function, or Ctrl-C landing
/// here) goes to its caller too, and is raised once the whole batch is
/// done, so that it stops this shard's loop as it would in asyncio.
pub(crate) fn run_incoming(
    py: Python<'_>,
    event_loop: &Bound<'_, PyAny>,
) -> PyResult<(usize, bool)> {
    let mut count = 0;
    let mut scheduled = false;
    let mut fatal: Option<PyErr> = None;
    loop {
        let batch = INBOX.with(|inbox| std::mem::take(&mut *inbox.borrow_mut()));
        if batch.is_empty() {
            break;
        }
        count += batch.len();
        for item in batch {
            let handled = match item {
                Incoming::Request(call) => serve(py, event_loop, call, &mut fatal),
                Incoming::Returned(call) => resolve(py, *call).map(|()| true),
                Incoming::Resolve { future, produce } => {
                    settle(py, future.bind(py), produce(py), None).map(|()| true)
                }
            };
            match handled {
                Ok(started) => scheduled |= started,
                Err(err) if stops_a_loop(py, &err) => {
                    fatal.get_or_insert(err);
                    scheduled = true;
                }
                Err(err) => {
                    report(py, event_loop, err);
                    scheduled = true;
                }
            }
        }
    }
    if count > 0 {
        shardloop_core::count_tasks(count as u64);
    }
    match fatal {
        Some(err) => Err(err),
        None => Ok((count, scheduled)),
    }
}

/// Whether `err` is one that stops an event loop rather than a callback
/// (asyncio lets `SystemExit` and `KeyboardInterrupt` through).
fn stops_a_loop(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<pyo3::exceptions::PySystemExit>(py)
        || err.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py)
}

/// call_tasks()
/// --
///
/// The tasks of this shard that run calls from other shards (a
/// shutting-down runtime gives them a grace period, and cancels the rest).
#[pyfunction]
fn call_tasks(py: Python<'_>) -> Vec<Py<PyAny>> {
    let runtime = shardloop_core::runtime_id().unwrap_or(0);
    RUNNING.with(|running| {
        running
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

/// Hands an error that has no caller to the loop's exception handler.
fn report(py: Python<'_>, event_loop: &Bound<'_, PyAny>, err: PyErr) {
    let context = pyo3::types::PyDict::new(py);
    let _ = context.set_item(
        "message",
        "shardloop: a cross-shard call could not be completed",
    );
    let _ = context.set_item("exception", exception_with_traceback(py, err));
    if let Err(err) = event_loop.call_method1(intern!(py, "call_exception_handler"), (context,)) {
        err.write_unraisable(py, Some(event_loop));
    }
}

/// Runs one request; returns whether it started a task on the event loop.
fn serve(
    py: Python<'_>,
    event_loop: &Bound<'_, PyAny>,
    mut call: Box<PyCall>,
    fatal: &mut Option<PyErr>,
) -> PyResult<bool> {
    match call.request.take() {
        Some(Request::Call { func, args, kwargs }) => {
            let result = func
                .bind(py)
                .call(args.bind(py), kwargs.as_ref().map(|k| k.bind(py)));
            // The callable and its arguments are released here, on the
            // target, where they were used.
            drop((func, args, kwargs));
            match result {
                Ok(value) if is_coroutine(py, &value) => {
                    return start_task(py, event_loop, call, value);
                }
                Err(err) if stops_a_loop(py, &err) => {
                    // The caller gets it, and it stops this loop too.
                    fatal.get_or_insert_with(|| err.clone_ref(py));
                    call.outcome = Some(Err(err));
                    answer(call);
                }
                other => {
                    call.outcome = Some(other.map(Bound::unbind));
                    answer(call);
                }
            }
        }
        Some(Request::Cancel { id }) => {
            let task = RUNNING.with(|running| {
                running
                    .borrow()
                    .get(&call_key(call.origin, id))
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
/// answers the call when it is done; cancellable from the caller.
fn start_task(
    py: Python<'_>,
    event_loop: &Bound<'_, PyAny>,
    mut call: Box<PyCall>,
    coroutine: Bound<'_, PyAny>,
) -> PyResult<bool> {
    let task = match event_loop.call_method1(intern!(py, "create_task"), (&coroutine,)) {
        Ok(task) => task,
        Err(err) => {
            // The loop refused it (closed, say): the caller gets the error,
            // and the coroutine is closed rather than never awaited.
            let _ = coroutine.call_method0(intern!(py, "close"));
            call.outcome = Some(Err(err));
            answer(call);
            return Ok(false);
        }
    };
    let key = call_key(call.origin, call.id);
    let responder = Bound::new(
        py,
        Responder {
            call: std::sync::Mutex::new(Some(call)),
        },
    )?;
    task.call_method1(intern!(py, "add_done_callback"), (responder,))?;
    let replaced = RUNNING.with(|running| running.borrow_mut().insert(key, task.unbind()));
    drop(replaced);
    Ok(true)
}

fn resolve(py: Python<'_>, mut call: PyCall) -> PyResult<()> {
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
/// another shard gets a note naming it; a `StopIteration`, which a future
/// cannot hold, reaches the caller as asyncio hands it over from a task: a
/// `RuntimeError` caused by it.
fn settle(
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
                add_shard_note(py, &err, shard);
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
pub(crate) fn deliverable(py: Python<'_>, err: PyErr) -> PyErr {
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

/// Adds "raised on shard N" to the exception's notes (PEP 678), unless the
/// exception cannot take notes (its `__notes__` is not a list): the
/// exception itself matters more than the note.
pub(crate) fn add_shard_note(py: Python<'_>, err: &PyErr, shard: usize) {
    let _ = err.add_note(py, format!("raised on shard {shard}"));
}

/// Whether a call's result is a coroutine, to be run as a task. Only real
/// coroutines are: a generator or another awaitable a plain function
/// returns comes back as it is. Most results have no `__await__` at all,
/// which one look at their type tells.
pub(crate) fn is_coroutine(py: Python<'_>, value: &Bound<'_, PyAny>) -> bool {
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

/// Done-callback of a task that runs a call for another shard: sends its
/// outcome back. Runs on its shard; may be dropped anywhere (a task that
/// never finished is collected wherever its loop goes), so it holds the call
/// behind a lock rather than being tied to its thread.
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
        let finished = RUNNING.with(|running| running.borrow_mut().remove(&key));
        drop(finished);
        let outcome = if task.call_method0(intern!(py, "cancelled"))?.is_truthy()? {
            Err(CancelledError::new_err(
                "the call was cancelled on its shard",
            ))
        } else {
            match task.call_method0(intern!(py, "exception"))? {
                exc if exc.is_none() => Ok(task.call_method0(intern!(py, "result"))?.unbind()),
                exc => Err(PyErr::from_value(exc)),
            }
        };
        call.outcome = Some(outcome);
        answer(call);
        Ok(())
    }
}

/// Done-callback of a caller's future for a cancellable call: when the
/// caller cancels, the task running the call on its shard is cancelled too.
#[pyclass(frozen)]
pub(crate) struct CancelOnDone {
    pub(crate) origin: usize,
    pub(crate) target: usize,
    pub(crate) id: u64,
}

#[pymethods]
impl CancelOnDone {
    fn __call__(&self, py: Python<'_>, future: &Bound<'_, PyAny>) -> PyResult<()> {
        if !future.call_method0(intern!(py, "cancelled"))?.is_truthy()? {
            return Ok(());
        }
        let cancel = PyCall {
            origin: self.origin,
            target: self.target,
            id: self.id,
            request: Some(Request::Cancel { id: self.id }),
            future: None,
            hook: None,
            outcome: None,
        };
        // A cancel during shutdown cannot be sent; the call then finishes.
        let _ = shardloop_core::send(self.target, Box::new(cancel));
        Ok(())
    }
}
