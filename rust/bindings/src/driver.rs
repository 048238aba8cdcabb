//! `Driver`: the handle through which a shard's asyncio loop turns the
//! shard's Rust poll loop, and sends calls to other shards.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyRuntimeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::call::{self, CancelOnDone, PyCall, Request};
use crate::conn;
use crate::errors::to_py;
use crate::gil;
use crate::stats;

/// Carries a value of this thread across `Python::detach`.
pub(crate) struct OnThisThread<T>(pub(crate) T);

// SAFETY: `Python::detach` runs its closure synchronously on the calling
// thread and returns before the caller continues, so the wrapped value (a
// shard's `!Send` handle, or a reference to it) never reaches another thread.
unsafe impl<T> Send for OnThisThread<T> {}

impl<T> OnThisThread<T> {
    /// The wrapped value. (A method, so closures capture the whole wrapper,
    /// not the `!Send` field.)
    pub(crate) fn into_inner(self) -> T {
        self.0
    }
}

/// What a thread keeps of a shard it runs. The Python `Driver` object is
/// only a token for it: the shard handle itself (`!Send`) never leaves the
/// thread, and the Python object may be dropped anywhere.
///
/// Nothing here is borrowed while Python runs: the list of drivers hands
/// out `Rc` clones, and the activation is only replaced or taken. Python
/// code can run at any call into Python, and at every return from
/// `detach` (deferred decrefs run `__del__` methods, which may submit).
struct Current {
    token: u64,
    driver: shardloop_core::Driver,
    next_id: Cell<u64>,
    /// Set while this shard's loop runs: the activation, the token that was
    /// active before, and the running loop.
    activation: RefCell<Option<Activation>>,
}

struct Activation {
    _guard: shardloop_core::Activation,
    previous: u64,
    event_loop: Py<PyAny>,
}

thread_local! {
    /// The shards whose loops live on this thread (usually one; a thread may
    /// keep loops of several runtimes, running one at a time).
    static DRIVERS: RefCell<Vec<Rc<Current>>> = const { RefCell::new(Vec::new()) };
    /// The token of the driver whose loop runs now, or 0.
    static ACTIVE: Cell<u64> = const { Cell::new(0) };
}

static TOKENS: AtomicU64 = AtomicU64::new(1);

fn find(token: u64) -> Option<Rc<Current>> {
    DRIVERS.with(|drivers| drivers.borrow().iter().find(|c| c.token == token).cloned())
}

/// The shard this thread runs, as seen by its event loop.
#[pyclass(frozen, module = "shardloop._shardloop")]
pub(crate) struct Driver {
    token: u64,
    shard_id: usize,
    shard_count: usize,
}

impl Driver {
    /// Keeps `driver` on this thread and returns its token object.
    pub(crate) fn install(driver: shardloop_core::Driver) -> Self {
        let token = TOKENS.fetch_add(1, Ordering::Relaxed);
        let (shard_id, shard_count) = (driver.shard_id(), driver.shard_count());
        gil::set_overprovisioned(driver.is_overprovisioned());
        gil::enter_shard();
        let current = Rc::new(Current {
            token,
            driver,
            next_id: Cell::new(0),
            activation: RefCell::new(None),
        });
        DRIVERS.with(|drivers| drivers.borrow_mut().push(current));
        Self {
            token,
            shard_id,
            shard_count,
        }
    }

    fn current(&self) -> PyResult<Rc<Current>> {
        find(self.token).ok_or_else(|| {
            PyRuntimeError::new_err("this shard driver is closed, or used off its shard's thread")
        })
    }

    /// Releases the shard from this thread; the driver is unusable after.
    pub(crate) fn close(&self) {
        let (released, last) = DRIVERS.with(|drivers| {
            let mut drivers = drivers.borrow_mut();
            let released = drivers
                .iter()
                .position(|c| c.token == self.token)
                .map(|index| drivers.remove(index));
            (released, drivers.is_empty())
        });
        if let Some(current) = released {
            current.deactivate();
            gil::leave_shard();
            if last {
                call::forget_thread_state();
            }
        }
    }
}

impl Current {
    /// Ends the activation, if any; the loop object is released last, with
    /// nothing borrowed.
    fn deactivate(&self) {
        let activation = self.activation.borrow_mut().take();
        if let Some(activation) = activation {
            // What connections were given in the loop's last turn still
            // goes out.
            conn::send_written();
            ACTIVE.with(|active| active.set(activation.previous));
            drop(activation);
        }
    }

    fn event_loop<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        self.activation
            .borrow()
            .as_ref()
            .map(|a| a.event_loop.clone_ref(py).into_bound(py))
    }
}

#[pymethods]
impl Driver {
    /// This shard's index.
    #[getter]
    fn shard_id(&self) -> usize {
        self.shard_id
    }

    /// The number of shards.
    #[getter]
    fn shard_count(&self) -> usize {
        self.shard_count
    }

    /// One turn of the shard's loop without waiting, with the GIL released;
    /// then runs the calls that arrived for `event_loop` and resolves the
    /// futures of calls that came back. Returns whether the watched
    /// descriptors signalled new readiness.
    fn poll(&self, py: Python<'_>, event_loop: &Bound<'_, PyAny>) -> PyResult<bool> {
        let shard = self.shard_id;
        let current = self.current()?;
        let driver = OnThisThread(&current.driver);
        let fd_ready = gil::detached(py, shard, move || {
            let driver = driver.into_inner();
            conn::send_written();
            driver.poll();
            driver.take_fd_ready()
        });
        call::run_incoming(py, event_loop)?;
        Ok(fd_ready)
    }

    /// Turns the shard's loop with the GIL released until there is work for
    /// `event_loop`: a watched descriptor is readable, a call came back or
    /// started a task, shutdown lets the shard stop, or `timeout` seconds
    /// pass (None: no limit). Calls of plain functions that arrive meanwhile
    /// are run and answered here, without a turn of the event loop. Returns
    /// whether the watched descriptors signalled new readiness.
    #[pyo3(signature = (event_loop, timeout=None))]
    fn wait(
        &self,
        py: Python<'_>,
        event_loop: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<bool> {
        // A timeout too long for a Duration waits without one.
        let until = timeout
            .and_then(|t| Duration::try_from_secs_f64(t.max(0.0)).ok())
            .and_then(|t| Instant::now().checked_add(t));
        let shard = self.shard_id;
        let timers = loop_queue_len(event_loop, intern!(py, "_scheduled"));
        let current = self.current()?;
        loop {
            let left = if call::has_incoming() {
                Some(Duration::ZERO)
            } else {
                until.map(|until| until.saturating_duration_since(Instant::now()))
            };
            let driver = OnThisThread(&current.driver);
            let (fd_ready, closing) = gil::detached(py, shard, move || {
                let driver = driver.into_inner();
                conn::send_written();
                driver.wait(left);
                (driver.take_fd_ready(), driver.is_closing())
            });
            // Signals (Ctrl-C) are handled here, so that a shard that turns
            // without returning to its loop still answers them.
            py.check_signals()?;
            let (ran, scheduled) = call::run_incoming(py, event_loop)?;
            let timed_out = until.is_some_and(|until| Instant::now() >= until);
            if fd_ready || scheduled || closing || timed_out || ran == 0 {
                return Ok(fd_ready);
            }
            // A plain call may still have left work for the loop: callbacks
            // (a cancelled task, a resolved future) or a new timer.
            if loop_queue_len(event_loop, intern!(py, "_ready")) != Some(0)
                || loop_queue_len(event_loop, intern!(py, "_scheduled")) != timers
            {
                return Ok(fd_ready);
            }
        }
    }

    /// Makes `wait` return when `fd` becomes readable.
    fn watch_fd(&self, fd: i32) -> PyResult<()> {
        Ok(self.current()?.driver.watch_fd(fd)?)
    }

    /// Whether shutdown has begun.
    fn is_closing(&self) -> PyResult<bool> {
        Ok(self.current()?.driver.is_closing())
    }

    /// Whether shutdown has begun and every shard has finished its calls
    /// (or the runtime was stopped without waiting for them).
    fn may_stop(&self) -> PyResult<bool> {
        Ok(self.current()?.driver.may_stop())
    }

    /// The runtime's counters.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snapshot = self.current()?.driver.stats();
        stats::to_dict(py, &snapshot)
    }

    /// Makes this shard the thread's current one while `event_loop` (its
    /// loop) runs.
    fn activate(&self, event_loop: Py<PyAny>) -> PyResult<()> {
        let current = self.current()?;
        if current.activation.borrow().is_some() {
            return Ok(());
        }
        let guard = current.driver.activate();
        let previous = ACTIVE.with(|active| active.replace(self.token));
        *current.activation.borrow_mut() = Some(Activation {
            _guard: guard,
            previous,
            event_loop,
        });
        Ok(())
    }

    /// Undoes `activate` when the loop stops.
    fn deactivate(&self) -> PyResult<()> {
        self.current()?.deactivate();
        Ok(())
    }

    /// Releases the shard from this thread; the driver is unusable after.
    #[pyo3(name = "close")]
    fn py_close(&self) {
        self.close();
    }
}

/// A call to the current shard runs at once, like Seastar's.
fn submit_local<'py>(
    py: Python<'py>,
    event_loop: &Bound<'py, PyAny>,
    me: usize,
    func: &Bound<'py, PyAny>,
    args: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    // The calls already sent this turn go out before this one runs here: it
    // may run long (invoke_on_all's own part, say).
    shardloop_core::flush();
    let result = func.call(args, kwargs);
    if let Ok(value) = &result {
        if call::is_coroutine(py, value) {
            return event_loop.call_method1(intern!(py, "create_task"), (value,));
        }
    }
    let future = event_loop.call_method0(intern!(py, "create_future"))?;
    match result {
        Ok(value) => future.call_method1(intern!(py, "set_result"), (value,))?,
        Err(err) => {
            let err = call::deliverable(py, err);
            call::add_shard_note(py, &err, me);
            future.call_method1(
                intern!(py, "set_exception"),
                (call::exception_with_traceback(py, err),),
            )?
        }
    };
    Ok(future)
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
        _ => Err(crate::errors::no_such_shard(shard_id, count)),
    }
}

/// The length of one of the asyncio loop's own queues (`_ready`, the
/// callbacks due now, or `_scheduled`, the timers); None if it has none.
fn loop_queue_len(
    event_loop: &Bound<'_, PyAny>,
    name: &Bound<'_, pyo3::types::PyString>,
) -> Option<usize> {
    event_loop.getattr(name).ok()?.len().ok()
}

/// The shard whose loop runs on this thread now.
fn active() -> PyResult<Rc<Current>> {
    find(ACTIVE.with(Cell::get)).ok_or_else(crate::errors::not_on_shard)
}

/// What `submit_to` needs of the shard whose loop runs on this thread: its
/// index, the shard count, a fresh call id and the loop.
fn active_shard(py: Python<'_>) -> PyResult<(usize, usize, u64, Bound<'_, PyAny>)> {
    let current = active()?;
    let event_loop = current
        .event_loop(py)
        .ok_or_else(crate::errors::not_on_shard)?;
    let id = current.next_id.get();
    current.next_id.set(id + 1);
    let driver = &current.driver;
    Ok((driver.shard_id(), driver.shard_count(), id, event_loop))
}

/// The running loop of this thread, if it is a shard's.
pub(crate) fn running_shard_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    active()?
        .event_loop(py)
        .ok_or_else(crate::errors::not_on_shard)
}

/// submit_to(shard_id, fn, /, *args, **kwargs)
/// --
///
/// Runs `fn(*args, **kwargs)` on shard `shard_id`; await the result.
///
/// A coroutine function runs as a task on the target shard and finishes
/// there. The call is sent at once; the returned future resolves on the
/// calling shard. An exception raised by `fn` is raised here, with its
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
    let (me, count, id, event_loop) = active_shard(py)?;
    let target = target_index(shard_id, count)?;
    shardloop_core::check_target(target).map_err(to_py)?;
    if target == me {
        return submit_local(py, &event_loop, me, &func, &args, kwargs.as_ref());
    }
    let future = event_loop.call_method0(intern!(py, "create_future"))?;
    // Whatever the call starts as a task there (a coroutine function's
    // coroutine, or one a plain function returns) is cancelled with the
    // caller's future.
    let hook = Bound::new(
        py,
        CancelOnDone {
            origin: me,
            target,
            id,
        },
    )?
    .into_any();
    let message = PyCall {
        origin: me,
        target,
        id,
        request: Some(Request::Call {
            func: func.unbind(),
            args: args.unbind(),
            kwargs: kwargs.map(Bound::unbind),
        }),
        future: Some(future.clone().unbind()),
        hook: Some(hook.clone().unbind()),
        outcome: None,
    };
    shardloop_core::send(target, Box::new(message)).map_err(to_py)?;
    future.call_method1(intern!(py, "add_done_callback"), (hook,))?;
    Ok(future)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Driver>()?;
    m.add_function(wrap_pyfunction!(submit_to, m)?)
}
