//! `Driver`: the handle through which a shard's asyncio loop turns the
//! shard's Rust poll loop (with the GIL released) and then runs, with the
//! GIL, what arrived for Python.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::board::Board;
use crate::call::settle::{settle, settle_answered};
use crate::call::{group, serve};
use crate::context::{self, Incoming, Shard};
use crate::errors;
use crate::future::Ready;
use crate::gil;
use crate::home::Home;
use crate::stall::Watch;
use crate::stats;
use crate::turn::{is_stopping, Scheduler};

/// The shard this thread runs, as seen by its event loop. The shard's state
/// stays on this thread; the Python object may go anywhere (see `Home`).
#[pyclass(frozen, module = "shardloop._shardloop")]
pub(crate) struct Driver {
    shard: Home<Shard>,
}

/// What a `Driver` object does when it goes: closes its shard.
fn close_shard(shard: Rc<Shard>) {
    if shard.close() && gil::leave_shard() {
        context::forget_shards();
    }
}

impl Driver {
    /// Keeps `driver`'s shard on this thread and returns its Python handle.
    pub(crate) fn install(
        py: Python<'_>,
        driver: shardloop_core::embed::Driver,
        stall: Option<Duration>,
        board: Arc<Board>,
    ) -> Self {
        gil::set_overprovisioned(driver.is_overprovisioned());
        gil::enter_shard(py);
        let watch = stall.map(|t| Watch::new(driver.shard_id(), t, &board.watches));
        let shard = Rc::new(Shard::new(driver, watch, board));
        let id = shard.id;
        Self {
            shard: Home::new(shard, id, close_shard, "a shard driver"),
        }
    }

    /// What the shards of this driver's runtime share.
    pub(crate) fn board(&self) -> PyResult<Arc<Board>> {
        Ok(self.shard.local()?.board.clone())
    }

    /// The shard and its core driver: `RuntimeError` once closed or off
    /// the shard's thread.
    fn open(&self) -> PyResult<(&Rc<Shard>, Rc<shardloop_core::embed::Driver>)> {
        let shard = self.shard.local()?;
        let driver = shard.driver().ok_or_else(|| {
            pyo3::exceptions::PyRuntimeError::new_err("this shard driver is closed")
        })?;
        Ok((shard, driver))
    }

    /// Releases the shard from this thread; the driver is unusable after.
    pub(crate) fn close(&self) {
        if let Ok(shard) = self.shard.local() {
            close_shard(shard.clone());
        }
    }
}

#[pymethods]
impl Driver {
    /// This shard's index.
    #[getter]
    fn shard_id(&self) -> usize {
        self.shard.shard()
    }

    /// The number of shards.
    #[getter]
    fn shard_count(&self) -> PyResult<usize> {
        Ok(self.shard.local()?.count)
    }

    /// One turn of the shard's loop without waiting, with the GIL released;
    /// then runs the calls that arrived for `event_loop` and settles the
    /// futures of calls that came back. Returns whether the watched
    /// descriptors signalled new readiness.
    fn poll(&self, py: Python<'_>, event_loop: &Bound<'_, PyAny>) -> PyResult<bool> {
        let (shard, driver) = self.open()?;
        shard.turn_ends();
        let fd_ready = gil::detached(py, shard.id, || {
            context::end_turn();
            driver.poll();
            driver.take_fd_ready()
        });
        shard.turn_begins();
        run_arrived(py, event_loop, shard, &driver)?;
        Ok(fd_ready)
    }

    /// Turns the shard's loop with the GIL released until there is work for
    /// `event_loop`: a watched descriptor is readable, a call started a
    /// task, something scheduled a callback or a timer or stopped the loop,
    /// shutdown lets the shard stop, or `timeout` seconds pass (None: no
    /// limit). Calls of plain functions that arrive meanwhile are run and
    /// answered here, and answers (and a `Connection`'s data) resume the
    /// tasks that await them here, without a turn of the event loop.
    /// Returns whether the watched descriptors signalled new readiness.
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
        let (shard, driver) = self.open()?;
        let timers = shard.turn.timers_added();
        loop {
            let left = if context::has_arrived() {
                Some(Duration::ZERO)
            } else {
                until.map(|until| until.saturating_duration_since(Instant::now()))
            };
            shard.turn_ends();
            let (fd_ready, closing) = gil::detached(py, shard.id, || {
                context::end_turn();
                driver.wait(left);
                (driver.take_fd_ready(), driver.is_closing())
            });
            shard.turn_begins();
            // Signals (Ctrl-C) are handled here, so that a shard that turns
            // without returning to its loop still answers them.
            py.check_signals()?;
            let (ran, scheduled) = run_arrived(py, event_loop, shard, &driver)?;
            let timed_out = until.is_some_and(|until| Instant::now() >= until);
            if fd_ready || scheduled || closing || timed_out || ran == 0 {
                return Ok(fd_ready);
            }
            // A plain call, or a task resumed by an answer, may still have
            // left work for the loop: callbacks (a finished task, a resolved
            // future), a new timer, or a stop. (A new descriptor to watch
            // makes the loop's epoll set readable, which ends the wait.)
            if shard.turn.has_ready()
                || shard.turn.timers_added() != timers
                || is_stopping(event_loop)
            {
                return Ok(fd_ready);
            }
        }
    }

    /// The scheduler of `event_loop`, this shard's loop: its ready queue,
    /// timers and turn (see `turn/mod.rs`). `threadsafe` is asyncio's `_ready`
    /// deque; `own_clock` says whether the loop's `time()` is
    /// `time.monotonic()`; `resolution` is its clock's resolution.
    fn scheduler(
        slf: &Bound<'_, Self>,
        event_loop: &Bound<'_, PyAny>,
        threadsafe: Py<PyAny>,
        own_clock: bool,
        resolution: f64,
    ) -> PyResult<Scheduler> {
        let shard = slf.get().shard.local()?;
        if !shard.turn.claim() {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(
                "this shard's loop already has its scheduler",
            ));
        }
        Scheduler::new(
            shard.turn.clone(),
            shard.id,
            slf.clone().into_any().unbind(),
            event_loop,
            threadsafe,
            own_clock,
            resolution,
        )
    }

    /// Makes `wait` return when `fd` becomes readable.
    fn watch_fd(&self, fd: i32) -> PyResult<()> {
        Ok(self.open()?.1.watch_fd(fd)?)
    }

    /// Whether shutdown has begun and every shard has finished its calls
    /// (or the runtime was stopped without waiting for them).
    fn may_stop(&self) -> PyResult<bool> {
        Ok(self.open()?.1.may_stop())
    }

    /// The runtime's counters.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (shard, driver) = self.open()?;
        stats::runtime_stats(py, &driver.stats(), &shard.board)
    }

    /// The runtime's counters, for reading from any thread.
    fn stats_reader(&self) -> PyResult<stats::StatsReader> {
        let (shard, driver) = self.open()?;
        Ok(stats::StatsReader {
            reader: driver.stats_reader(),
            board: shard.board.clone(),
        })
    }

    /// Makes this shard the thread's current one while `event_loop` (its
    /// loop) runs.
    fn activate(&self, event_loop: Py<PyAny>) -> PyResult<()> {
        self.open()?.0.activate(event_loop);
        Ok(())
    }

    /// Undoes `activate` when the loop stops.
    fn deactivate(&self) -> PyResult<()> {
        self.shard.local()?.deactivate();
        Ok(())
    }

    /// Releases the shard from this thread; the driver is unusable after.
    #[pyo3(name = "close")]
    fn py_close(&self) {
        self.close();
    }
}

/// Serves every request and settles every answered call (and every Rust
/// task's future) that arrived on this shard (see `context::Incoming`);
/// `event_loop` is the shard's asyncio loop. Returns how many there were,
/// and whether any of them left work for the event loop (a task started or
/// a future settled) rather than only answering plain calls.
///
/// Nothing a user's code raises escapes from here but what stops a loop: a
/// call's exception goes to its caller, and a failure to deliver one (a
/// future that refuses its outcome, say) goes to the loop's exception
/// handler, as asyncio reports errors of callbacks. A `SystemExit` or
/// `KeyboardInterrupt` raised by a served function goes to its caller too,
/// and is raised once the whole batch is done, so that it stops this
/// shard's loop as it would in asyncio.
///
/// Ctrl-C is looked for after every request served (on the main thread,
/// where Python handles signals): what is left of the batch goes back to
/// the inbox and the `KeyboardInterrupt` is raised at once. Once the
/// runtime is stopped without waiting for its calls, the requests left
/// are dropped rather than run.
fn run_arrived(
    py: Python<'_>,
    event_loop: &Bound<'_, PyAny>,
    shard: &Shard,
    driver: &shardloop_core::embed::Driver,
) -> PyResult<(usize, bool)> {
    let mut count = 0;
    let mut scheduled = false;
    let mut fatal: Option<PyErr> = None;
    // The done-callbacks of the calls answered in a batch run once the whole
    // batch is settled: a task awaiting several answers finds them all done.
    let mut ready: Vec<Ready> = Vec::new();
    loop {
        let mut batch = context::take_arrived().into_iter();
        if batch.len() == 0 {
            break;
        }
        while let Some(item) = batch.next() {
            count += 1;
            let handled = match item {
                Incoming::Request(_) if driver.is_force_stopped() => Ok(false),
                Incoming::Request(call) => {
                    let served = serve::serve(py, event_loop, shard, call, &mut fatal);
                    if let Err(interrupt) = py.check_signals() {
                        context::put_back(batch.collect());
                        for callbacks in ready.drain(..) {
                            let _ = callbacks.schedule(py);
                        }
                        shardloop_core::embed::count_tasks(count as u64);
                        return Err(fatal.unwrap_or(interrupt));
                    }
                    served
                }
                Incoming::Answered(call) => {
                    let counted = call.group.map(|group| (group, call.target));
                    ready.extend(settle_answered(py, *call));
                    if let Some((group, target)) = counted {
                        group::release(py, &shard.admission, group, target);
                    }
                    // Its callbacks run in this pass; what they leave for
                    // the loop is looked for after it.
                    Ok(false)
                }
                Incoming::Settle { future, produce } => {
                    ready.extend(settle(py, future.bind(py), produce(py), None));
                    Ok(false)
                }
                // What it leaves for the loop is looked for after the pass.
                Incoming::Work(work) => work.run(py).map(|()| false),
            };
            match handled {
                Ok(started) => scheduled |= started,
                Err(err) if errors::stops_a_loop(py, &err) => {
                    fatal.get_or_insert(err);
                    scheduled = true;
                }
                Err(err) => {
                    report(py, event_loop, err);
                    scheduled = true;
                }
            }
        }
        let mut settled = ready.drain(..);
        while let Some(callbacks) = settled.next() {
            if let Err(err) = callbacks.run(py) {
                // Only what stops a loop comes out of a callback; the loop
                // runs the rest after it, as it would have.
                fatal.get_or_insert(err);
                for rest in settled.by_ref() {
                    let _ = rest.schedule(py);
                }
            }
        }
    }
    if count > 0 {
        shardloop_core::embed::count_tasks(count as u64);
    }
    match fatal {
        Some(err) => Err(err),
        None => Ok((count, scheduled)),
    }
}

/// Hands an error that has no caller to the loop's exception handler.
fn report(py: Python<'_>, event_loop: &Bound<'_, PyAny>, err: PyErr) {
    let context = PyDict::new(py);
    let _ = context.set_item(
        "message",
        "shardloop: a cross-shard call could not be completed",
    );
    let _ = context.set_item("exception", errors::exception_with_traceback(py, err));
    if let Err(err) = event_loop.call_method1(intern!(py, "call_exception_handler"), (context,)) {
        err.write_unraisable(py, Some(event_loop));
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Driver>()?;
    m.add_class::<stats::StatsReader>()
}
