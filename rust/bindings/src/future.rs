//! `ShardFuture`: the future a cross-shard call (and a `Connection`'s
//! read or drain, and a Rust task) gives Python, in Rust.
//!
//! It speaks asyncio's future protocol (`__await__`,
//! `_asyncio_future_blocking`, `get_loop`, `done`, `result`, `exception`,
//! `add_done_callback`, `remove_done_callback`, `cancel`, `cancelled`), so
//! CPython's C `Task`, `gather`, `wait_for`, `shield`, `wait` and
//! `TaskGroup` take it as they take an `asyncio.Future`: a task awaiting it
//! adds its wake-up as a done-callback, as it does on any foreign future.
//!
//! What makes it cheaper than an asyncio future is where it is settled. The
//! driver settles it in the same pass of the shard's poll in which the
//! answer arrived ([`ShardFuture::settle`]), and runs its done-callbacks
//! there and then, each in its context: the awaiting task resumes without
//! a `Handle`, a `call_soon` or a turn of the event loop. Callbacks of a
//! future that is done by other means (cancelled by its caller, or given a
//! callback after it finished) are scheduled with `call_soon`, as asyncio
//! schedules them, since those run inside the caller's own code.
//!
//! Cancelling the future of a call sends the cancel to the call's shard at
//! once (or withdraws the call, if its service group still holds it back).

use pyo3::exceptions::asyncio::{CancelledError, InvalidStateError};
use pyo3::exceptions::{PyBaseException, PyRuntimeError, PyStopIteration};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::{PyTraverseError, PyVisit};

use crate::errors::{exception_with_traceback, stops_a_loop};

/// The call a future waits for, and how to cancel it where it runs.
#[derive(Clone, Copy)]
pub(crate) struct CallRef {
    pub(crate) origin: usize,
    pub(crate) target: usize,
    pub(crate) id: u64,
    /// The call's service group (see `call::group`).
    pub(crate) group: u32,
    /// Sends the cancel (`call::send::cancel_call`); false if it cannot
    /// be sent from here and now (the loop is not running).
    pub(crate) cancel: fn(CallRef) -> bool,
}

enum State {
    Pending,
    Finished(Py<PyAny>),
    /// The exception, and the traceback it had when it was set: raising it
    /// again starts from that one, as an asyncio future's does, rather than
    /// growing with every `result()`.
    Failed(Py<PyBaseException>, Option<Py<PyAny>>),
    Cancelled(Option<Py<PyAny>>),
}

/// A done-callback and the context it runs in.
struct Callback {
    function: Py<PyAny>,
    context: Py<PyAny>,
}

/// ShardFuture
/// --
///
/// The future of a cross-shard call, of a Connection's read or drain, or of
/// a Rust task: an asyncio-compatible future of one shard's loop, settled
/// by the shard itself.
#[pyclass(module = "shardloop._shardloop", weakref)]
pub(crate) struct ShardFuture {
    state: State,
    callbacks: Vec<Callback>,
    event_loop: Option<Py<PyAny>>,
    blocking: bool,
    /// Whether the exception it holds was handed to anyone; one that never
    /// was is reported to the loop's exception handler when the future goes.
    retrieved: bool,
    call: Option<CallRef>,
}

impl ShardFuture {
    /// A pending future of `event_loop`; `call` is the call it waits for,
    /// if any.
    pub(crate) fn new(event_loop: Py<PyAny>, call: Option<CallRef>) -> Self {
        Self {
            state: State::Pending,
            callbacks: Vec::new(),
            event_loop: Some(event_loop),
            blocking: false,
            retrieved: false,
            call,
        }
    }

    /// The future as a task finds it when an awaitable yields it.
    pub(crate) fn yielded(mut self) -> Self {
        self.blocking = true;
        self
    }

    fn is_pending(&self) -> bool {
        matches!(self.state, State::Pending)
    }

    fn event_loop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.event_loop
            .as_ref()
            .map(|l| l.bind(py).clone())
            .ok_or_else(|| PyRuntimeError::new_err("this future was cleared"))
    }

    /// The outcome as `result()` gives it.
    fn outcome(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match &self.state {
            State::Pending => Err(InvalidStateError::new_err("Result is not ready.")),
            State::Finished(value) => Ok(value.clone_ref(py)),
            State::Failed(exc, traceback) => {
                self.retrieved = true;
                let exc = exc.bind(py);
                let traceback = traceback
                    .as_ref()
                    .map_or_else(|| py.None(), |t| t.clone_ref(py));
                let _ = exc.setattr(intern!(py, "__traceback__"), traceback);
                Err(PyErr::from_value(exc.clone().into_any()))
            }
            State::Cancelled(msg) => Err(cancelled_error(py, msg.as_ref())),
        }
    }

    /// Settles `future` with `outcome`; returns its done-callbacks, for the
    /// driver to run once every answer of its pass is settled (see the
    /// module's comment). A future already done (cancelled by its caller)
    /// drops the outcome. A `CancelledError` cancels it.
    pub(crate) fn settle(
        future: &Bound<'_, ShardFuture>,
        outcome: PyResult<Py<PyAny>>,
    ) -> Option<Ready> {
        let py = future.py();
        let mut this = future.borrow_mut();
        if !this.is_pending() {
            return None;
        }
        this.state = match outcome {
            Ok(value) => State::Finished(value),
            Err(err) if err.is_instance_of::<CancelledError>(py) => {
                let message = err
                    .value(py)
                    .str()
                    .ok()
                    .filter(|m| m.len().unwrap_or(0) > 0);
                State::Cancelled(message.map(|m| m.into_any().unbind()))
            }
            Err(err) => {
                let exc = exception_with_traceback(py, err);
                let traceback = exc
                    .getattr(intern!(py, "__traceback__"))
                    .ok()
                    .filter(|t| !t.is_none())
                    .map(Bound::unbind);
                State::Failed(exc.unbind(), traceback)
            }
        };
        let callbacks = std::mem::take(&mut this.callbacks);
        if callbacks.is_empty() {
            return None;
        }
        Some(Ready {
            future: future.clone().unbind(),
            callbacks,
        })
    }

    /// Whether `future` is done (for the driver, which drops outcomes of
    /// futures nobody waits for any more).
    pub(crate) fn is_done(future: &Bound<'_, ShardFuture>) -> bool {
        !future.borrow().is_pending()
    }
}

/// The done-callbacks of a future the driver settled, to run once the
/// driver's pass has settled every answer it took.
pub(crate) struct Ready {
    future: Py<ShardFuture>,
    callbacks: Vec<Callback>,
}

impl Ready {
    /// Runs the callbacks, in order, each in its context. One that raises
    /// an `Exception` is reported to the loop's exception handler, as
    /// asyncio reports a failing callback, and the rest still run; a
    /// `SystemExit` or `KeyboardInterrupt` stops the pass: the callbacks
    /// left are scheduled with `call_soon`, and the error propagates to stop
    /// the loop, as it would from a callback asyncio runs.
    pub(crate) fn run(self, py: Python<'_>) -> PyResult<()> {
        let future = self.future.bind(py);
        let mut callbacks = self.callbacks.into_iter();
        while let Some(callback) = callbacks.next() {
            let Err(err) = call_in_context(py, &callback, future) else {
                continue;
            };
            if stops_a_loop(py, &err) {
                let _ = schedule(future, callbacks.collect());
                return Err(err);
            }
            report_callback_error(py, future, &callback.function, err);
        }
        Ok(())
    }

    /// Schedules the callbacks with the loop's `call_soon` instead (a pass
    /// that stops early leaves them to the loop).
    pub(crate) fn schedule(self, py: Python<'_>) -> PyResult<()> {
        schedule(self.future.bind(py), self.callbacks)
    }
}

/// `function(future)` inside `context`.
fn call_in_context(
    py: Python<'_>,
    callback: &Callback,
    future: &Bound<'_, ShardFuture>,
) -> PyResult<()> {
    in_context(py, callback.context.bind(py), || {
        callback.function.bind(py).call1((future,)).map(drop)
    })
}

/// Runs `f` inside the `contextvars` context `context`, as
/// `context.run(f)` would.
pub(crate) fn in_context<R>(
    py: Python<'_>,
    context: &Bound<'_, PyAny>,
    f: impl FnOnce() -> PyResult<R>,
) -> PyResult<R> {
    let context = context.as_ptr();
    // SAFETY: `context` is a live contextvars.Context (the caller's
    // reference holds it for the call's length); entering it with the GIL
    // held is what `Context.run` does. Each successful enter is matched by
    // an exit on the same thread, with no Python frame of ours in between.
    if unsafe { pyo3::ffi::PyContext_Enter(context) } != 0 {
        return Err(PyErr::fetch(py));
    }
    let done = f();
    // SAFETY: the context entered just above, on this thread.
    let exited = unsafe { pyo3::ffi::PyContext_Exit(context) };
    if exited != 0 {
        let exit_err = PyErr::fetch(py);
        return done.and(Err(exit_err));
    }
    done
}

fn report_callback_error(
    py: Python<'_>,
    future: &Bound<'_, ShardFuture>,
    function: &Py<PyAny>,
    err: PyErr,
) {
    let Ok(event_loop) = future.borrow().event_loop(py) else {
        err.write_unraisable(py, Some(future));
        return;
    };
    let context = PyDict::new(py);
    let described = shown(function.bind(py), "<callback>");
    let _ = context.set_item("message", format!("Exception in callback {described}"));
    let _ = context.set_item("exception", exception_with_traceback(py, err));
    let _ = context.set_item("future", future);
    if let Err(err) = event_loop.call_method1(intern!(py, "call_exception_handler"), (context,)) {
        err.write_unraisable(py, Some(&event_loop));
    }
}

/// Schedules `callbacks` of the done `future` with the loop's `call_soon`.
fn schedule(future: &Bound<'_, ShardFuture>, callbacks: Vec<Callback>) -> PyResult<()> {
    if callbacks.is_empty() {
        return Ok(());
    }
    let py = future.py();
    let call_soon = future
        .borrow()
        .event_loop(py)?
        .getattr(intern!(py, "call_soon"))?;
    for callback in callbacks {
        let kwargs = PyDict::new(py);
        kwargs.set_item(intern!(py, "context"), callback.context)?;
        call_soon.call((callback.function, future), Some(&kwargs))?;
    }
    Ok(())
}

/// A `CancelledError`, with `msg` if there is one.
fn cancelled_error(py: Python<'_>, msg: Option<&Py<PyAny>>) -> PyErr {
    match msg {
        Some(msg) => CancelledError::new_err((msg.clone_ref(py),)),
        None => CancelledError::new_err(()),
    }
}

/// The current context, copied: the one a callback added without its own
/// runs in.
pub(crate) fn copy_context(py: Python<'_>) -> PyResult<Py<PyAny>> {
    // SAFETY: called with the GIL held; returns a new reference or NULL
    // with an exception set, which `from_owned_ptr_or_err` takes over.
    unsafe {
        Bound::from_owned_ptr_or_err(py, pyo3::ffi::PyContext_CopyCurrent()).map(Bound::unbind)
    }
}

#[pymethods]
impl ShardFuture {
    fn __await__(slf: Bound<'_, Self>) -> AwaitShard {
        AwaitShard {
            future: slf.unbind(),
            yielded: false,
        }
    }

    fn __iter__(slf: Bound<'_, Self>) -> AwaitShard {
        Self::__await__(slf)
    }

    /// `ShardFuture[T]`, for annotations evaluated at run time.
    #[classmethod]
    fn __class_getitem__<'py>(
        cls: &Bound<'py, pyo3::types::PyType>,
        item: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = cls.py();
        py.import(intern!(py, "types"))?
            .getattr(intern!(py, "GenericAlias"))?
            .call1((cls, item))
    }

    /// Set while a task waits on this future (asyncio's protocol).
    #[getter(_asyncio_future_blocking)]
    fn blocking(&self) -> bool {
        self.blocking
    }

    #[setter(_asyncio_future_blocking)]
    fn set_blocking(&mut self, value: bool) {
        self.blocking = value;
    }

    /// The event loop the future belongs to.
    fn get_loop(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self.event_loop(py)?.unbind())
    }

    #[getter]
    fn _loop(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.get_loop(py)
    }

    /// The message the future was cancelled with (asyncio's `gather` reads
    /// it).
    #[getter]
    fn _cancel_message(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        match &self.state {
            State::Cancelled(Some(msg)) => Some(msg.clone_ref(py)),
            _ => None,
        }
    }

    /// The `CancelledError` that `result()` would raise (asyncio's `gather`
    /// asks for it).
    fn _make_cancelled_error(&self, py: Python<'_>) -> Py<PyAny> {
        let msg = match &self.state {
            State::Cancelled(msg) => msg.as_ref(),
            _ => None,
        };
        cancelled_error(py, msg).into_value(py).into_any()
    }

    fn done(&self) -> bool {
        !self.is_pending()
    }

    fn cancelled(&self) -> bool {
        matches!(self.state, State::Cancelled(_))
    }

    /// The call's result; raises its exception, `CancelledError` if it was
    /// cancelled, `InvalidStateError` if it is not done.
    fn result(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.outcome(py)
    }

    /// The call's exception, or None; raises `CancelledError` if it was
    /// cancelled, `InvalidStateError` if it is not done.
    fn exception(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match &self.state {
            State::Pending => Err(InvalidStateError::new_err("Exception is not set.")),
            State::Finished(_) => Ok(None),
            State::Failed(exc, _) => {
                self.retrieved = true;
                Ok(Some(exc.clone_ref(py).into_any()))
            }
            State::Cancelled(msg) => Err(cancelled_error(py, msg.as_ref())),
        }
    }

    /// Calls `fn(future)` when the future is done (scheduled with the
    /// loop's `call_soon` if it is already), in `context` or a copy of the
    /// current one.
    #[pyo3(signature = (r#fn, *, context = None))]
    fn add_done_callback(
        slf: &Bound<'_, Self>,
        r#fn: Py<PyAny>,
        context: Option<Py<PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let context = match context {
            Some(context) if !context.is_none(py) => context,
            _ => copy_context(py)?,
        };
        let callback = Callback {
            function: r#fn,
            context,
        };
        let mut this = slf.borrow_mut();
        if this.is_pending() {
            this.callbacks.push(callback);
            return Ok(());
        }
        drop(this);
        schedule(slf, vec![callback])
    }

    /// Removes every done-callback equal to `fn`; returns how many.
    #[pyo3(signature = (r#fn, /))]
    fn remove_done_callback(slf: &Bound<'_, Self>, r#fn: &Bound<'_, PyAny>) -> PyResult<usize> {
        // (The removed callbacks are dropped once nothing is borrowed: a
        // drop may run Python code.)
        let py = slf.py();
        let functions: Vec<Py<PyAny>> = slf
            .borrow()
            .callbacks
            .iter()
            .map(|c| c.function.clone_ref(py))
            .collect();
        // A comparison may run Python code, even code that settles or
        // cancels this future: nothing is borrowed or taken out while it
        // runs, and what compared equal is removed from the callbacks as
        // they are afterwards.
        let mut equal = Vec::new();
        for function in &functions {
            if function.bind(py).eq(r#fn)? {
                equal.push(function.as_ptr());
            }
        }
        if equal.is_empty() {
            return Ok(0);
        }
        let removed: Vec<Callback> = {
            let mut this = slf.borrow_mut();
            let (removed, kept) = std::mem::take(&mut this.callbacks)
                .into_iter()
                .partition(|c| equal.contains(&c.function.as_ptr()));
            this.callbacks = kept;
            removed
        };
        Ok(removed.len())
    }

    /// Cancels the future and the call it waits for (a coroutine running
    /// on its shard is cancelled there; a plain function already running
    /// finishes and its result is dropped). False if it was done already.
    #[pyo3(signature = (msg = None))]
    fn cancel(slf: &Bound<'_, Self>, msg: Option<Py<PyAny>>) -> PyResult<bool> {
        let (callbacks, call) = {
            let mut this = slf.borrow_mut();
            if !this.is_pending() {
                return Ok(false);
            }
            this.state = State::Cancelled(msg);
            (std::mem::take(&mut this.callbacks), this.call.take())
        };
        if let Some(call) = call {
            if !(call.cancel)(call) {
                // Cancelled while its loop does not run: sent once it does.
                let later = Bound::new(slf.py(), SendCancel { call })?;
                slf.borrow()
                    .event_loop(slf.py())?
                    .call_method1(intern!(slf.py(), "call_soon"), (later,))?;
            }
        }
        schedule(slf, callbacks)?;
        Ok(true)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let state = match &self.state {
            State::Pending => "pending".to_owned(),
            State::Finished(value) => {
                format!("finished result={}", shorten(&shown(value.bind(py), "?")))
            }
            State::Failed(exc, _) => {
                format!(
                    "finished exception={}",
                    shorten(&shown(exc.bind(py).as_any(), "?"))
                )
            }
            State::Cancelled(_) => "cancelled".to_owned(),
        };
        match self.call {
            Some(call) => format!(
                "<ShardFuture {state} call {} from shard {} to shard {}>",
                call.id, call.origin, call.target
            ),
            None => format!("<ShardFuture {state}>"),
        }
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(event_loop) = &self.event_loop {
            visit.call(event_loop)?;
        }
        for callback in &self.callbacks {
            visit.call(&callback.function)?;
            visit.call(&callback.context)?;
        }
        match &self.state {
            State::Finished(value) => visit.call(value),
            State::Failed(exc, traceback) => {
                visit.call(exc)?;
                match traceback {
                    Some(traceback) => visit.call(traceback),
                    None => Ok(()),
                }
            }
            State::Cancelled(Some(msg)) => visit.call(msg),
            _ => Ok(()),
        }
    }

    fn __clear__(&mut self) {
        self.callbacks.clear();
        self.event_loop = None;
        if !self.is_pending() {
            self.state = State::Cancelled(None);
        }
    }
}

/// The cancel of a call whose future was cancelled while its loop did not
/// run, scheduled on that loop.
#[pyclass(frozen)]
struct SendCancel {
    call: CallRef,
}

#[pymethods]
impl SendCancel {
    fn __call__(&self) {
        // Still not on its shard (the loop runs elsewhere now): the call
        // finishes, and its answer is dropped.
        let _ = (self.call.cancel)(self.call);
    }
}

/// The repr of `object`, or `fallback` if its `__repr__` fails.
fn shown(object: &Bound<'_, PyAny>, fallback: &str) -> String {
    object
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| fallback.to_owned())
}

/// A long repr cut down, as asyncio's reprlib does for a future's result.
fn shorten(text: &str) -> String {
    const LIMIT: usize = 60;
    if text.chars().count() <= LIMIT {
        return text.to_owned();
    }
    let head: String = text.chars().take(LIMIT - 3).collect();
    format!("{head}...")
}

impl Drop for ShardFuture {
    /// An exception nobody retrieved is reported, as asyncio reports it
    /// ("Future exception was never retrieved").
    fn drop(&mut self) {
        let State::Failed(exc, _) = &self.state else {
            return;
        };
        if self.retrieved {
            return;
        }
        let Some(event_loop) = self.event_loop.take() else {
            return;
        };
        Python::attach(|py| {
            let event_loop = event_loop.bind(py);
            if event_loop
                .call_method0(intern!(py, "is_closed"))
                .and_then(|closed| closed.is_truthy())
                .unwrap_or(true)
            {
                return;
            }
            let context = PyDict::new(py);
            let message = match self.call {
                Some(call) => format!(
                    "Future exception was never retrieved (a call from shard {} to shard {})",
                    call.origin, call.target
                ),
                None => "Future exception was never retrieved".to_owned(),
            };
            let _ = context.set_item("message", message);
            let _ = context.set_item("exception", exc.bind(py));
            if let Err(err) =
                event_loop.call_method1(intern!(py, "call_exception_handler"), (context,))
            {
                err.write_unraisable(py, Some(event_loop));
            }
        });
    }
}

/// What `await future` iterates: yields the future once while it is
/// pending (with `_asyncio_future_blocking` set, as asyncio's futures do),
/// then returns its result.
#[pyclass(module = "shardloop._shardloop")]
pub(crate) struct AwaitShard {
    future: Py<ShardFuture>,
    yielded: bool,
}

#[pymethods]
impl AwaitShard {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// `Ok(None)` ends the iteration with None without raising
    /// `StopIteration`; any other result is returned through
    /// `StopIteration(result)`.
    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let future = self.future.bind(py);
        let mut this = future.borrow_mut();
        if this.is_pending() {
            if self.yielded {
                return Err(PyRuntimeError::new_err("await wasn't used with future"));
            }
            self.yielded = true;
            this.blocking = true;
            drop(this);
            return Ok(Some(future.clone().into_any().unbind()));
        }
        let value = this.outcome(py)?;
        if value.is_none(py) {
            return Ok(None);
        }
        Err(PyStopIteration::new_err((value,)))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ShardFuture>()?;
    m.add_class::<AwaitShard>()
}
