//! A loop's callbacks: `Handle` (made by `call_soon`) and `TimerHandle`
//! (made by `call_later` and `call_at`), asyncio's classes of those names
//! as native objects. Like uvloop's, they are not subclasses of
//! `asyncio.Handle` (a native class cannot extend a Python one); they
//! answer the same methods and attributes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::pyclass::CompareOp;
use pyo3::types::{PyFloat, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::errors::{exception_with_traceback, stops_a_loop, while_handling};
use crate::future::in_context;

/// What a handle calls: the function and its arguments.
pub(super) struct Callback {
    pub(super) function: Py<PyAny>,
    pub(super) args: Py<PyTuple>,
}

/// `asyncio.Handle`'s counterpart: a callback scheduled by `call_soon`.
///
/// The cancelled flag, the callback and the debug-mode fields change after
/// creation; they sit behind a lock of their own, as a handle may be
/// cancelled from any thread (as asyncio's may, racily).
#[pyclass(frozen, subclass, weakref, module = "shardloop._shardloop")]
pub(crate) struct Handle {
    state: std::sync::Mutex<HandleState>,
    /// The `contextvars` context the callback runs in (kept once
    /// cancelled, as asyncio keeps it).
    context: Py<PyAny>,
    event_loop: Py<PyAny>,
}

struct HandleState {
    /// `None` once cancelled (as asyncio drops it, to break cycles).
    callback: Option<Callback>,
    cancelled: bool,
    source_traceback: Option<Py<PyAny>>,
    repr: Option<Py<PyAny>>,
}

impl Handle {
    pub(super) fn new(callback: Callback, context: Py<PyAny>, event_loop: Py<PyAny>) -> Self {
        Self {
            state: std::sync::Mutex::new(HandleState {
                callback: Some(callback),
                cancelled: false,
                source_traceback: None,
                repr: None,
            }),
            context,
            event_loop,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HandleState> {
        // A panic cannot happen while the lock is held (only moves of
        // fields), so the state is never left half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn is_cancelled(&self) -> bool {
        self.state().cancelled
    }

    /// The callback, until `cancel` lets go of it.
    fn callback(&self, py: Python<'_>) -> Option<(Py<PyAny>, Py<PyTuple>)> {
        let state = self.state();
        let callback = state.callback.as_ref()?;
        Some((callback.function.clone_ref(py), callback.args.clone_ref(py)))
    }

    /// The callback to run, unless cancelled; the lock is released before
    /// it is called. (`cancel` on another thread marks the handle a moment
    /// before it lets go of the callback, so the flag is what counts.)
    fn runnable(&self, py: Python<'_>) -> Option<(Py<PyAny>, Py<PyTuple>)> {
        let state = self.state();
        let callback = state.callback.as_ref().filter(|_| !state.cancelled)?;
        Some((callback.function.clone_ref(py), callback.args.clone_ref(py)))
    }

    /// Cancels the handle; returns whether it was not cancelled before.
    fn cancel_once(slf: &Bound<'_, Self>) -> PyResult<bool> {
        let py = slf.py();
        let this = slf.get();
        {
            let mut state = this.state();
            if state.cancelled {
                return Ok(false);
            }
            state.cancelled = true;
        }
        // In debug mode the handle keeps what it was, for the warning about
        // a slow callback (asyncio's `_repr`): made cancelled, before the
        // callback goes.
        if debug(this.event_loop.bind(py)) {
            let repr = slf.repr()?.into_any().unbind();
            this.state().repr = Some(repr);
        }
        let callback = this.state().callback.take();
        drop(callback);
        Ok(true)
    }

    /// Runs the callback in its context. An exception goes to the loop's
    /// exception handler (through `ShardLoop._callback_failed`); only what
    /// stops a loop comes out.
    pub(super) fn run(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let Some((function, args)) = slf.get().runnable(py) else {
            return Ok(());
        };
        let context = &slf.get().context;
        let outcome = in_context(py, context.bind(py), || {
            function.bind(py).call1(args.bind(py)).map(drop)
        });
        let Err(err) = outcome else { return Ok(()) };
        if stops_a_loop(py, &err) {
            return Err(err);
        }
        let exc = exception_with_traceback(py, err);
        let event_loop = slf.get().event_loop.bind(py);
        // Reported as from asyncio's `except` block: the exception handler
        // sees it in `sys.exc_info()` (for `logging.exception`, say).
        let reported = while_handling(&exc, || {
            event_loop.call_method1(intern!(py, "_callback_failed"), (slf, &exc))
        });
        if let Err(err) = reported {
            if stops_a_loop(py, &err) {
                return Err(err);
            }
            err.write_unraisable(py, Some(slf));
        }
        Ok(())
    }
}

/// Whether `event_loop` is in debug mode.
fn debug(event_loop: &Bound<'_, PyAny>) -> bool {
    let py = event_loop.py();
    event_loop
        .getattr(intern!(py, "_debug"))
        .and_then(|debug| debug.is_truthy())
        .unwrap_or(false)
}

#[pymethods]
impl Handle {
    /// Cancels the callback: it will not run. Idempotent.
    fn cancel(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::cancel_once(slf).map(drop)
    }

    fn cancelled(&self) -> bool {
        self.is_cancelled()
    }

    fn get_context(&self, py: Python<'_>) -> Py<PyAny> {
        self.context.clone_ref(py)
    }

    /// Runs the callback now, as the loop would.
    fn _run(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::run(slf)
    }

    #[getter]
    fn _callback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.callback(py).map(|(function, _)| function)
    }

    #[getter]
    fn _args(&self, py: Python<'_>) -> Option<Py<PyTuple>> {
        self.callback(py).map(|(_, args)| args)
    }

    #[getter]
    fn _context(&self, py: Python<'_>) -> Py<PyAny> {
        self.get_context(py)
    }

    #[getter]
    fn _cancelled(&self) -> bool {
        self.is_cancelled()
    }

    #[getter]
    fn _loop(&self, py: Python<'_>) -> Py<PyAny> {
        self.event_loop.clone_ref(py)
    }

    #[getter(_source_traceback)]
    fn source_traceback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.state()
            .source_traceback
            .as_ref()
            .map(|t| t.clone_ref(py))
    }

    #[setter(_source_traceback)]
    fn set_source_traceback(&self, value: Option<Py<PyAny>>) {
        let old = std::mem::replace(&mut self.state().source_traceback, value);
        drop(old);
    }

    #[getter]
    fn _repr(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.state().repr.as_ref().map(|r| r.clone_ref(py))
    }

    fn __repr__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get()
            .event_loop
            .bind(py)
            .call_method1(intern!(py, "_handle_repr"), (slf,))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.event_loop)?;
        visit.call(&self.context)?;
        // A handle being changed on another thread is skipped this time.
        let Ok(state) = self.state.try_lock() else {
            return Ok(());
        };
        if let Some(callback) = &state.callback {
            visit.call(&callback.function)?;
            visit.call(&callback.args)?;
        }
        visit.call(&state.source_traceback)?;
        visit.call(&state.repr)
    }

    fn __clear__(&self) {
        let Ok(mut state) = self.state.try_lock() else {
            return;
        };
        let callback = state.callback.take();
        let traceback = state.source_traceback.take();
        drop(state);
        drop((callback, traceback));
    }
}

/// `asyncio.TimerHandle`'s counterpart: a callback scheduled by
/// `call_later` or `call_at`.
#[pyclass(frozen, extends = Handle, module = "shardloop._shardloop")]
pub(crate) struct TimerHandle {
    pub(super) when: f64,
    /// Whether it is in its loop's heap.
    pub(super) scheduled: AtomicBool,
    /// The heap's count of cancelled timers.
    pub(super) cancelled_timers: Arc<AtomicUsize>,
}

#[pymethods]
impl TimerHandle {
    /// When the callback is due, on the loop's clock.
    fn when(&self) -> f64 {
        self.when
    }

    #[getter]
    fn _when(&self) -> f64 {
        self.when
    }

    #[getter]
    fn _scheduled(&self) -> bool {
        self.scheduled.load(Relaxed)
    }

    fn cancel(slf: &Bound<'_, Self>) -> PyResult<()> {
        if Handle::cancel_once(slf.as_super())? && slf.get().scheduled.load(Relaxed) {
            slf.get().cancelled_timers.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    fn __hash__(&self, py: Python<'_>) -> PyResult<isize> {
        // Python's hash of the time, as asyncio's (0.0 and -0.0 are equal).
        PyFloat::new(py, self.when).hash()
    }

    fn __richcmp__(
        slf: &Bound<'_, Self>,
        other: &Bound<'_, PyAny>,
        op: CompareOp,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let Ok(other) = other.cast::<TimerHandle>() else {
            return Ok(py.NotImplemented());
        };
        let (a, b) = (slf.get().when, other.get().when);
        let result = match op {
            CompareOp::Lt => a < b,
            CompareOp::Gt => a > b,
            // asyncio's: earlier, or equal (the same time, callback,
            // arguments and state).
            CompareOp::Le => a < b || same(slf, other)?,
            CompareOp::Ge => a > b || same(slf, other)?,
            CompareOp::Eq => same(slf, other)?,
            CompareOp::Ne => !same(slf, other)?,
        };
        Ok(result.into_pyobject(py)?.to_owned().into_any().unbind())
    }
}

/// asyncio's `TimerHandle.__eq__`: the same time, callback, arguments and
/// cancelled state.
fn same(a: &Bound<'_, TimerHandle>, b: &Bound<'_, TimerHandle>) -> PyResult<bool> {
    let py = a.py();
    if a.get().when != b.get().when {
        return Ok(false);
    }
    let (a, b) = (a.as_super(), b.as_super());
    Ok(a.get().is_cancelled() == b.get().is_cancelled()
        && a.getattr(intern!(py, "_callback"))?
            .eq(b.getattr(intern!(py, "_callback"))?)?
        && a.getattr(intern!(py, "_args"))?
            .eq(b.getattr(intern!(py, "_args"))?)?)
}
