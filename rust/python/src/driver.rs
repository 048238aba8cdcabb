//! `Driver`: the handle through which a shard's asyncio loop turns the
//! shard's Rust poll loop, and sends calls to other shards.

use std::cell::{Cell, RefCell};
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
struct Current {
    token: u64,
    driver: shardloop_core::Driver,
    next_id: Cell<u64>,
    /// Set while this shard's loop runs: the activation, the token that was
    /// active before, and the running loop.
    activation: Option<(shardloop_core::Activation, u64, Py<PyAny>)>,
}

thread_local! {
    /// The shards whose loops live on this thread (usually one; a thread may
    /// keep loops of several runtimes, running one at a time).
    static DRIVERS: RefCell<Vec<Current>> = const { RefCell::new(Vec::new()) };
    /// The token of the driver whose loop runs now, or 0.
    static ACTIVE: Cell<u64> = const { Cell::new(0) };
}

static TOKENS: AtomicU64 = AtomicU64::new(1);

fn with_token<R>(token: u64, f: impl FnOnce(&mut Current) -> R) -> Option<R> {
    DRIVERS.with(|drivers| {
        drivers
            .borrow_mut()
            .iter_mut()
            .find(|c| c.token == token)
            .map(f)
    })
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
        DRIVERS.with(|drivers| {
            drivers.borrow_mut().push(Current {
                token,
                driver,
                next_id: Cell::new(0),
                activation: None,
            })
        });
        Self {
            token,
            shard_id,
            shard_count,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Current) -> R) -> PyResult<R> {
        with_token(self.token, f).ok_or_else(|| {
            PyRuntimeError::new_err("this shard driver is closed, or used off its shard's thread")
        })
    }

    /// Releases the shard from this thread; the driver is unusable after.
    pub(crate) fn close(&self) {
        let released = DRIVERS.with(|drivers| {
            let mut drivers = drivers.borrow_mut();
            let index = drivers.iter().position(|c| c.token == self.token)?;
            Some(drivers.remove(index))
        });
        if let Some(mut current) = released {
            if let Some((activation, previous, _)) = current.activation.take() {
                // What connections were given in the loop's last turn still
                // goes out.
                conn::send_written();
                drop(activation);
                ACTIVE.with(|active| active.set(previous));
            }
        }
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
        let fd_ready = self.with(|state| {
            let driver = OnThisThread(&state.driver);
            gil::detached(py, shard, move || {
                let driver = driver.into_inner();
                conn::send_written();
                driver.poll();
                driver.take_fd_ready()
            })
        })?;
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
        let until = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        let shard = self.shard_id;
        let timers = loop_queue_len(py, event_loop, intern!(py, "_scheduled"));
        loop {
            let left = if call::has_incoming() {
                Some(Duration::ZERO)
            } else {
                until.map(|until| until.saturating_duration_since(Instant::now()))
            };
            let (fd_ready, closing) = self.with(|state| {
                let driver = OnThisThread(&state.driver);
                gil::detached(py, shard, move || {
                    let driver = driver.into_inner();
                    conn::send_written();
                    driver.wait(left);
                    (driver.take_fd_ready(), driver.is_closing())
                })
            })?;
            let (ran, scheduled) = call::run_incoming(py, event_loop)?;
            let timed_out = until.is_some_and(|until| Instant::now() >= until);
            if fd_ready || scheduled || closing || timed_out || ran == 0 {
                return Ok(fd_ready);
            }
            // A plain call may still have left work for the loop: callbacks
            // (a cancelled task, a resolved future) or a new timer.
            if loop_queue_len(py, event_loop, intern!(py, "_ready")) != Some(0)
                || loop_queue_len(py, event_loop, intern!(py, "_scheduled")) != timers
            {
                return Ok(fd_ready);
            }
        }
    }

    /// Makes `wait` return when `fd` becomes readable.
    fn watch_fd(&self, fd: i32) -> PyResult<()> {
        self.with(|state| state.driver.watch_fd(fd))?
            .map_err(PyErr::from)
    }

    /// Whether shutdown has begun.
    fn is_closing(&self) -> PyResult<bool> {
        self.with(|state| state.driver.is_closing())
    }

    /// Whether shutdown has begun and every shard has finished its calls.
    fn may_stop(&self) -> PyResult<bool> {
        self.with(|state| state.driver.may_stop())
    }

    /// The runtime's counters.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snapshot = self.with(|state| state.driver.stats())?;
        stats::to_dict(py, &snapshot)
    }

    /// Makes this shard the thread's current one while `event_loop` (its
    /// loop) runs.
    fn activate(&self, event_loop: Py<PyAny>) -> PyResult<()> {
        let token = self.token;
        self.with(|current| {
            if current.activation.is_none() {
                let previous = ACTIVE.with(|active| active.replace(token));
                current.activation = Some((current.driver.activate(), previous, event_loop));
            }
        })
    }

    /// Undoes `activate` when the loop stops.
    fn deactivate(&self) -> PyResult<()> {
        self.with(|current| {
            if let Some((activation, previous, _)) = current.activation.take() {
                // What connections were given in the loop's last turn still
                // goes out.
                conn::send_written();
                drop(activation);
                ACTIVE.with(|active| active.set(previous));
            }
        })
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
        static ISCOROUTINE: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
        if ISCOROUTINE
            .import(py, "asyncio", "iscoroutine")?
            .call1((value,))?
            .is_truthy()?
        {
            return event_loop.call_method1(intern!(py, "create_task"), (value,));
        }
    }
    let future = event_loop.call_method0(intern!(py, "create_future"))?;
    match result {
        Ok(value) => future.call_method1(intern!(py, "set_result"), (value,))?,
        Err(err) => {
            call::add_shard_note(py, &err, me)?;
            future.call_method1(
                intern!(py, "set_exception"),
                (call::exception_with_traceback(py, err),),
            )?
        }
    };
    Ok(future)
}

/// The length of one of the asyncio loop's own queues (`_ready`, the
/// callbacks due now, or `_scheduled`, the timers); None if it has none.
fn loop_queue_len(
    py: Python<'_>,
    event_loop: &Bound<'_, PyAny>,
    name: &Bound<'_, pyo3::types::PyString>,
) -> Option<usize> {
    let _ = py;
    event_loop.getattr(name).ok()?.len().ok()
}

/// What `submit_to` needs of the shard whose loop runs on this thread: its
/// index, the shard count, a fresh call id and the loop.
fn active_shard(py: Python<'_>) -> PyResult<(usize, usize, u64, Bound<'_, PyAny>)> {
    with_token(ACTIVE.with(Cell::get), |state| {
        let (_, _, event_loop) = state.activation.as_ref()?;
        let id = state.next_id.get();
        state.next_id.set(id + 1);
        let (me, count) = (state.driver.shard_id(), state.driver.shard_count());
        Some((me, count, id, event_loop.clone_ref(py).into_bound(py)))
    })
    .flatten()
    .ok_or_else(crate::errors::not_on_shard)
}

/// The running loop of this thread, if it is a shard's.
pub(crate) fn running_shard_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    with_token(ACTIVE.with(Cell::get), |state| {
        state
            .activation
            .as_ref()
            .map(|(_, _, event_loop)| event_loop.clone_ref(py).into_bound(py))
    })
    .flatten()
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
    shard_id: i64,
    func: Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
    kwargs: Option<Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let (me, count, id, event_loop) = active_shard(py)?;
    let target = usize::try_from(shard_id).unwrap_or(usize::MAX);
    shardloop_core::check_target(target).map_err(|e| match e {
        shardloop_core::Error::NoSuchShard { .. } => to_py(shardloop_core::Error::NoSuchShard {
            shard: shard_id.max(0) as usize,
            count,
        }),
        other => to_py(other),
    })?;
    if shard_id < 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "shard {shard_id} does not exist: valid shards are 0..{count} (0 to {})",
            count - 1
        )));
    }
    if target == me {
        return submit_local(py, &event_loop, me, &func, &args, kwargs.as_ref());
    }
    let future = event_loop.call_method0(intern!(py, "create_future"))?;
    let cancellable = !call::is_plain_function(py, &func);
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
        outcome: None,
    };
    shardloop_core::send(target, Box::new(message)).map_err(to_py)?;
    if cancellable {
        let hook = Bound::new(
            py,
            CancelOnDone {
                origin: me,
                target,
                id,
            },
        )?;
        future.call_method1(intern!(py, "add_done_callback"), (hook,))?;
    }
    Ok(future)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Driver>()?;
    m.add_function(wrap_pyfunction!(submit_to, m)?)
}
