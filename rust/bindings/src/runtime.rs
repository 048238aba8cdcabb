//! `Runtime`: starts the shards, whose threads run a Python function that
//! drives them, and stops them.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::board::Board;
use crate::driver::Driver;
use crate::errors;
use crate::gil;
use crate::home::Home;

/// The core's runtime; taken out by `shutdown`.
type Owned = RefCell<Option<shardloop_core::Runtime>>;

/// A running set of shards; the thread that builds it is shard 0. The
/// `!Send` runtime stays on that thread; the Python object may go anywhere
/// (see `Home`).
#[pyclass(frozen, module = "shardloop._shardloop")]
pub(crate) struct Runtime {
    owned: Home<Owned>,
    /// The stall threshold of every shard (None: stall detection is off).
    stall: Option<Duration>,
    /// What the shards share in the bindings.
    board: Arc<Board>,
}

impl Runtime {
    fn with<R>(&self, f: impl FnOnce(&shardloop_core::Runtime) -> R) -> PyResult<R> {
        let owned = self.owned.local()?;
        let runtime = owned.borrow();
        match runtime.as_ref() {
            Some(runtime) => Ok(f(runtime)),
            None => Err(PyRuntimeError::new_err("the runtime has been shut down")),
        }
    }
}

/// What a `Runtime` object does when it goes: one whose Python object goes
/// before `shutdown` (Ctrl-C landing just after it was built, say) is
/// stopped without waiting for its calls, and its threads are joined, so
/// that nothing is left running.
fn stop_now(owned: Rc<Owned>) {
    let runtime = owned.borrow_mut().take();
    if let Some(runtime) = runtime {
        runtime.force_stop();
        Python::attach(|py| {
            gil::detached_exit_aware(py, move || runtime.shutdown());
        });
    }
}

/// What shards 1..N run: `worker(driver)` with the GIL, then the driver is
/// closed on this thread whatever `worker` did. A thread that starts while
/// the interpreter exits does not enter Python at all.
fn worker_main(
    worker: &Py<PyAny>,
    driver: shardloop_core::embed::Driver,
    stall: Option<Duration>,
    board: Arc<Board>,
) {
    if !gil::may_enter() {
        return;
    }
    Python::attach(|py| {
        let driver = match Bound::new(py, Driver::install(py, driver, stall, board)) {
            Ok(driver) => driver,
            Err(err) => return err.display(py),
        };
        // `display`, not `print`: printing a SystemExit would exit the
        // process from this thread (the worker reports those to shard 0).
        if let Err(err) = worker.call1(py, (driver.clone(),)) {
            err.display(py);
        }
        driver.get().close();
    });
}

/// The stack of shard threads 1..N: what CPython's own threads get on
/// Linux by default (the usual `ulimit -s`), so that Python code that runs
/// on a `threading.Thread` runs on a shard too (Rust's default is 2 MiB).
const SHARD_STACK_SIZE: usize = 8 << 20;

/// How long `shutdown` keeps waiting for shard threads once it stopped
/// them without waiting for their calls.
const STUCK_THREAD_LIMIT: Duration = Duration::from_secs(1);

#[pymethods]
impl Runtime {
    /// Starts `shards` shards (None: one per CPU of `cpuset`, by default
    /// every available one). Shards 1..N run `worker(driver)` on their own
    /// threads.
    #[new]
    #[pyo3(signature = (
        worker, shards=None, pin=true, idle_poll=0.0002, overprovisioned=false, stall_threshold=None,
        cpuset=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        worker: Py<PyAny>,
        shards: Option<usize>,
        pin: bool,
        idle_poll: f64,
        overprovisioned: bool,
        stall_threshold: Option<f64>,
        cpuset: Option<Vec<usize>>,
    ) -> PyResult<Self> {
        let stall = stall_threshold
            .map(|t| errors::duration("stall_threshold", t))
            .transpose()?;
        if gil::exiting() {
            return Err(PyRuntimeError::new_err(
                "the interpreter is exiting: no runtime can start",
            ));
        }
        let board = Arc::new(Board::default());
        let shared = board.clone();
        let mut builder = shardloop_core::Runtime::builder()
            .pin(pin)
            .overprovisioned(overprovisioned)
            .idle_poll(errors::duration("idle_poll", idle_poll)?)
            .stack_size(SHARD_STACK_SIZE);
        if let Some(shards) = shards {
            builder = builder.shards(shards);
        }
        if let Some(cpuset) = cpuset {
            builder = builder.cpuset(cpuset);
        }
        let runtime = builder
            .build_driven(move |driver| worker_main(&worker, driver, stall, shared.clone()))
            .map_err(errors::build_error)?;
        let owned = Rc::new(RefCell::new(Some(runtime)));
        Ok(Self {
            owned: Home::new(owned, 0, stop_now, "a runtime"),
            stall,
            board,
        })
    }

    /// The driver of shard 0, for the calling thread's event loop.
    fn driver(&self, py: Python<'_>) -> PyResult<Py<Driver>> {
        let driver = self.with(|rt| rt.driver())?;
        Py::new(
            py,
            Driver::install(py, driver, self.stall, self.board.clone()),
        )
    }

    /// Refuses new calls and tells every shard to finish and stop.
    fn begin_shutdown(&self) -> PyResult<()> {
        self.with(|rt| rt.begin_shutdown())
    }

    /// Stops every shard now, without waiting for the calls in flight.
    fn force_stop(&self) -> PyResult<()> {
        self.with(|rt| rt.force_stop())
    }

    /// Whether no call between shards was in flight a moment ago, and
    /// none waited in a service group to be sent. (The waiting are looked
    /// at first: a call leaves its group's queue only once it is sent.)
    fn is_quiet(&self) -> PyResult<bool> {
        self.with(|rt| !self.board.pairs.any_waiting() && rt.is_quiet())
    }

    /// Finishes submitted work and joins the shard threads (with the GIL
    /// released, so they can finish their Python work). Shard 0's driver must
    /// be closed first. Signals are handled while it waits. Past `limit`
    /// seconds (None: no limit), or a second after a Ctrl-C that raised,
    /// the shards are stopped at once; threads still busy in Python a
    /// second after that are left running, with a `RuntimeWarning`.
    #[pyo3(signature = (limit=None))]
    fn shutdown(&self, py: Python<'_>, limit: Option<f64>) -> PyResult<()> {
        let runtime = self.owned.local()?.borrow_mut().take();
        let Some(runtime) = runtime else {
            return Ok(());
        };
        runtime.begin_shutdown();
        let started = Instant::now();
        let limit = limit.map(|l| Duration::try_from_secs_f64(l.max(0.0)).unwrap_or(Duration::MAX));
        let mut interrupted: Option<PyErr> = None;
        let mut forced_at: Option<Instant> = None;
        loop {
            let stopped = gil::detached_exit_aware(py, || {
                runtime.serve_until_stopped(Duration::from_millis(2))
            });
            if stopped {
                break;
            }
            if interrupted.is_none() {
                if let Err(err) = py.check_signals() {
                    interrupted = Some(err);
                }
            }
            let overdue = limit.is_some_and(|limit| started.elapsed() >= limit);
            if forced_at.is_none() && (overdue || interrupted.is_some()) {
                runtime.force_stop();
                forced_at = Some(Instant::now());
            }
            if forced_at.is_some_and(|at| at.elapsed() >= STUCK_THREAD_LIMIT) {
                // The threads are stuck in Python code; leave them.
                std::mem::forget(runtime);
                if let Some(err) = interrupted {
                    return Err(err);
                }
                return PyErr::warn(
                    py,
                    &py.get_type::<pyo3::exceptions::PyRuntimeWarning>(),
                    c"shardloop: shard threads still busy in Python code after the runtime \
                      stopped were left running",
                    1,
                );
            }
        }
        gil::detached_exit_aware(py, move || runtime.shutdown());
        interrupted.map_or(Ok(()), Err)
    }
}

/// prepare_exit(limit=10.0, /)
/// --
///
/// Called once at interpreter exit, before finalization: shard threads
/// still running (a runtime in a daemon thread) stop entering Python, and
/// this waits up to `limit` seconds (or until Ctrl-C) for those inside it
/// to leave.
#[pyfunction]
#[pyo3(signature = (limit = 10.0, /))]
fn prepare_exit(py: Python<'_>, limit: f64) -> PyResult<()> {
    gil::prepare_exit(py, errors::duration("limit", limit)?)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Runtime>()?;
    m.add_function(wrap_pyfunction!(prepare_exit, m)?)
}
