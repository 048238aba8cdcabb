//! The turn of a shard's event loop in Rust: asyncio's ready queue, its
//! timer heap, `call_soon`/`call_later`/`call_at` (whose handles are in
//! `handle.rs`), and `_run_once` itself.
//!
//! asyncio keeps these in Python (`BaseEventLoop._ready`, `_scheduled`,
//! `events.Handle`), so every callback costs a few Python frames to
//! schedule and one more to run. Here a handle is a native object, the
//! queues (`LoopQueues`) are Rust collections kept with the shard (the
//! driver looks at them to know whether its wait must end), and a turn
//! runs its callbacks without a Python frame of its own.
//!
//! The semantics are asyncio's `_run_once`: FIFO callbacks; the callbacks
//! scheduled by this turn's callbacks run on the next turn, after another
//! poll; timers due within the clock's resolution are run; a cancelled
//! handle is skipped; the heap drops its cancelled timers when they are
//! more than half of more than 100; an exception from a callback goes to
//! the loop's exception handler, and a `SystemExit` or `KeyboardInterrupt`
//! stops the turn, leaving the rest queued. Where it differs, on purpose:
//! - a NaN time is refused (`ValueError`): it would never be due, and would
//!   hold back every timer after it;
//! - `call_soon`, `call_later` and `call_at` from another thread act as
//!   their thread-safe forms (asyncio's race), except in debug mode, where
//!   asyncio's thread check raises;
//! - timers due at the same time run in the order they were made;
//! - a turn without I/O events does not call the loop's `_process_events`
//!   (unless shutdown waits for the shard to stop, `_stopped`);
//! - `loop._ready` and `loop._scheduled` do not show what is queued
//!   (`Scheduler.pending` does).
//!
//! What stays in Python (`ShardLoop` in `_loop.py`): the debug mode's
//! checks and slow-callback warnings, the exception handler's report of a
//! failing callback, the clock of a loop whose `time()` was replaced, and
//! what other threads schedule: asyncio's own `_ready` deque, where
//! `call_soon_threadsafe` (and any `call_*` made on another thread) puts
//! its handles, and which each turn empties into these queues.

mod handle;

use handle::Callback;
pub(crate) use handle::{Handle, TimerHandle};

use std::cell::{Cell, RefCell};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyList, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::future::copy_context;
use crate::home::Home;

/// asyncio's `MAXIMUM_SELECT_TIMEOUT`: the longest a turn waits.
const MAXIMUM_SELECT_TIMEOUT: f64 = 24.0 * 3600.0;
/// asyncio's `_MIN_SCHEDULED_TIMER_HANDLES`: below this many timers, the
/// cancelled ones are only dropped from the heap's head.
const MIN_SCHEDULED_TIMERS: usize = 100;

/// The queues of one shard's loop, kept with the shard. Nothing here is
/// borrowed while Python runs: an object dropped inside a borrow could run
/// a `__del__` that schedules a callback, so what leaves a queue is dropped
/// after the borrow ends.
#[derive(Default)]
pub(crate) struct LoopQueues {
    /// The callbacks to run: our `Handle`s, or any object with `_cancelled`
    /// and `_run()` (asyncio's own, from `add_reader` and signal handlers).
    ready: RefCell<VecDeque<Py<PyAny>>>,
    timers: RefCell<BinaryHeap<Due>>,
    /// Numbers the timers, so that those due at the same time run in the
    /// order they were made.
    next_timer: Cell<u64>,
    /// How many timers in the heap are cancelled; their handles count here
    /// when cancelled (from any thread, hence atomic).
    cancelled_timers: Arc<AtomicUsize>,
    /// Whether a scheduler uses these queues: a shard has one loop.
    claimed: Cell<bool>,
}

/// A timer in the heap.
struct Due {
    key: DueKey,
    timer: Py<TimerHandle>,
}

impl Due {
    fn is_cancelled(&self, py: Python<'_>) -> bool {
        self.timer.bind(py).as_super().get().is_cancelled()
    }
}

/// Where a timer sits in the heap: ordered so that the heap's top (its
/// greatest) is the earliest timer, and of timers due at the same time,
/// the first made.
#[derive(Clone, Copy, Debug)]
struct DueKey {
    when: f64,
    order: u64,
}

impl Ord for DueKey {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .when
            .total_cmp(&self.when)
            .then(other.order.cmp(&self.order))
    }
}

impl PartialOrd for DueKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for DueKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for DueKey {}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key.cmp(&other.key)
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Due {}

impl LoopQueues {
    /// Claims the queues for a loop's scheduler: `false` if one has them.
    pub(crate) fn claim(&self) -> bool {
        !self.claimed.replace(true)
    }

    /// Whether a callback waits to run.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.borrow().is_empty()
    }

    /// How many timers were ever added: the driver's wait ends when it
    /// changes, as a new timer may be due sooner than the wait's end.
    pub(crate) fn timers_added(&self) -> u64 {
        self.next_timer.get()
    }

    fn push(&self, handle: Py<PyAny>) {
        self.ready.borrow_mut().push_back(handle);
    }

    fn pop(&self) -> Option<Py<PyAny>> {
        self.ready.borrow_mut().pop_front()
    }

    fn add_timer(&self, when: f64, timer: Py<TimerHandle>) {
        let order = self.next_timer.get();
        self.next_timer.set(order + 1);
        let key = DueKey { when, order };
        self.timers.borrow_mut().push(Due { key, timer });
    }

    /// When the earliest timer is due.
    fn next_due(&self) -> Option<f64> {
        self.timers.borrow().peek().map(|due| due.key.when)
    }

    /// Drops cancelled timers from the heap as asyncio does: all of them
    /// when they are more than half of more than 100 timers, else those at
    /// the head.
    fn drop_cancelled(&self, py: Python<'_>) {
        let mut dropped = Vec::new();
        {
            let mut timers = self.timers.borrow_mut();
            let count = timers.len();
            let cancelled = self.cancelled_timers.load(Relaxed);
            if count > MIN_SCHEDULED_TIMERS && cancelled > count / 2 {
                let (gone, kept): (Vec<Due>, Vec<Due>) = std::mem::take(&mut *timers)
                    .into_iter()
                    .partition(|due| due.is_cancelled(py));
                *timers = BinaryHeap::from(kept);
                self.cancelled_timers.store(0, Relaxed);
                dropped = gone;
            } else {
                while timers.peek().is_some_and(|due| due.is_cancelled(py)) {
                    dropped.extend(timers.pop());
                    // Saturating: a timer cancelled on another thread counts
                    // itself a moment after it is marked cancelled.
                    let _ = self
                        .cancelled_timers
                        .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
                }
            }
        }
        for due in &dropped {
            due.timer.get().scheduled.store(false, Relaxed);
        }
        drop(dropped);
    }

    /// Moves the timers due before `end` to the ready queue.
    fn move_due(&self, end: f64) {
        loop {
            let due = {
                let mut timers = self.timers.borrow_mut();
                match timers.peek() {
                    Some(due) if due.key.when < end => timers.pop(),
                    _ => None,
                }
            };
            let Some(due) = due else { return };
            due.timer.get().scheduled.store(false, Relaxed);
            self.push(due.timer.into_any());
        }
    }

    /// Visits what the queues hold, for the garbage collector (nothing if
    /// they are borrowed now).
    fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Ok(ready) = self.ready.try_borrow() {
            for handle in ready.iter() {
                visit.call(handle)?;
            }
        }
        if let Ok(timers) = self.timers.try_borrow() {
            for due in timers.iter() {
                visit.call(&due.timer)?;
            }
        }
        Ok(())
    }

    /// Empties both queues (the loop closed, or the collector clears the
    /// scheduler); a queue borrowed now is left as it is.
    pub(crate) fn clear(&self) {
        let ready = self
            .ready
            .try_borrow_mut()
            .map(|mut r| std::mem::take(&mut *r));
        let timers = self
            .timers
            .try_borrow_mut()
            .map(|mut t| std::mem::take(&mut *t));
        if timers.is_ok() {
            self.cancelled_timers.store(0, Relaxed);
        }
        // Dropped with nothing borrowed: a handle's `__del__` may schedule.
        drop((ready, timers));
    }
}

/// What a `ShardLoop`'s `call_soon`, `call_later`, `call_at`,
/// `_add_callback` and `_run_once` do (the loop installs these methods as
/// its own, see `_loop.py`).
#[pyclass(frozen, module = "shardloop._shardloop")]
pub(crate) struct Scheduler {
    turn: Home<LoopQueues>,
    event_loop: Py<PyAny>,
    /// asyncio's own `_ready` deque: `call_soon_threadsafe` from other
    /// threads appends there, and each turn moves what it holds here.
    threadsafe: Py<PyAny>,
    /// Whether the loop's clock is `time.monotonic()`; if not (a subclass
    /// replaced `time()`), its `time()` is asked.
    own_clock: bool,
    /// asyncio's `_clock_resolution`: timers due within it run now.
    resolution: f64,
    /// The shard's `Driver`, whose `poll` and `wait` a turn calls.
    driver: Py<PyAny>,
    /// The loop's debug mode (`set_debug` keeps it here).
    debug: AtomicBool,
    /// Set when the loop closes.
    closed: AtomicBool,
    /// The turn's count of cancelled timers, for the timers made here.
    cancelled_timers: Arc<AtomicUsize>,
    /// The loop object's `__dict__`: a `time` there (a test's fake clock)
    /// is the loop's clock.
    instance_dict: Py<PyDict>,
}

impl Scheduler {
    /// asyncio's `_check_closed`.
    fn check_open(&self) -> PyResult<()> {
        if self.closed.load(Relaxed) {
            return Err(PyRuntimeError::new_err("Event loop is closed"));
        }
        Ok(())
    }

    /// A handle of this loop for `function(*args)` in `context` (`None`: a
    /// copy of the current one).
    fn handle(
        &self,
        py: Python<'_>,
        function: Py<PyAny>,
        args: Py<PyTuple>,
        context: Option<Py<PyAny>>,
    ) -> PyResult<Handle> {
        let context = match context {
            Some(context) => context,
            None => copy_context(py)?,
        };
        let callback = Callback { function, args };
        Ok(Handle::new(
            callback,
            context,
            self.event_loop.clone_ref(py),
        ))
    }

    /// Queues a handle made on another thread, as `call_soon_threadsafe`
    /// does: in asyncio's deque, with a wake-up of the loop. (asyncio's
    /// `call_soon` from another thread races; here it is safe.)
    fn queue_from_elsewhere(&self, handle: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = handle.py();
        self.threadsafe
            .bind(py)
            .call_method1(intern!(py, "append"), (handle,))?;
        self.event_loop
            .bind(py)
            .call_method0(intern!(py, "_write_to_self"))?;
        Ok(())
    }

    /// The loop's time.
    fn now(&self, py: Python<'_>) -> PyResult<f64> {
        let replaced = || {
            self.instance_dict
                .bind(py)
                .contains(intern!(py, "time"))
                .unwrap_or(true)
        };
        if !self.own_clock || replaced() {
            return self
                .event_loop
                .bind(py)
                .call_method0(intern!(py, "time"))?
                .extract();
        }
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC
        // always exists on Linux, so the call cannot fail.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        Ok(now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9)
    }

    /// Moves what other threads added to asyncio's deque to the queue.
    /// (A timer made on another thread joins the heap.)
    fn take_threadsafe(&self, py: Python<'_>, turn: &LoopQueues) -> PyResult<()> {
        let deque = self.threadsafe.bind(py);
        // Only this thread takes from the deque while the loop is open; the
        // length is asked again each time, in case it was cleared.
        while deque.len()? > 0 {
            let handle = deque.call_method0(intern!(py, "popleft"))?;
            match handle.cast_into::<TimerHandle>() {
                Ok(timer) => turn.add_timer(timer.get().when, timer.unbind()),
                Err(other) => turn.push(other.into_inner().unbind()),
            }
        }
        Ok(())
    }
}

/// Whether `loop.stop()` was called (asyncio's `_stopping`).
pub(crate) fn is_stopping(event_loop: &Bound<'_, PyAny>) -> bool {
    let py = event_loop.py();
    event_loop
        .getattr(intern!(py, "_stopping"))
        .and_then(|stopping| stopping.is_truthy())
        .unwrap_or(true)
}

impl Scheduler {
    /// The scheduler of shard `shard`'s loop `event_loop`, whose queues
    /// are `turn` (kept with the shard, on this thread).
    pub(crate) fn new(
        turn: Rc<LoopQueues>,
        shard: usize,
        driver: Py<PyAny>,
        event_loop: &Bound<'_, PyAny>,
        threadsafe: Py<PyAny>,
        own_clock: bool,
        resolution: f64,
    ) -> PyResult<Self> {
        let py = event_loop.py();
        let instance_dict = event_loop
            .getattr(intern!(py, "__dict__"))?
            .cast_into::<PyDict>()?
            .unbind();
        Ok(Self {
            cancelled_timers: turn.cancelled_timers.clone(),
            turn: Home::new(turn, shard, drop, "a shard loop's scheduler"),
            event_loop: event_loop.clone().unbind(),
            threadsafe,
            own_clock,
            resolution,
            driver,
            debug: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            instance_dict,
        })
    }

    /// What the loop's selector found ready (`select(timeout)`). The
    /// selector (`_ShardSelector`) is only asked when its epoll set may
    /// hold events; otherwise the driver polls, or waits, directly, and
    /// the selector is asked only if a watched descriptor signalled.
    fn select<'py>(
        &self,
        event_loop: &Bound<'py, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = event_loop.py();
        let selector = event_loop.getattr(intern!(py, "_selector"))?;
        let look = intern!(py, "_look");
        if selector.getattr(look)?.is_truthy()? {
            return selector.call_method1(intern!(py, "select"), (timeout,));
        }
        let driver = self.driver.bind(py);
        let signalled = match timeout {
            Some(timeout) if timeout <= 0.0 => {
                driver.call_method1(intern!(py, "poll"), (event_loop,))
            }
            _ => driver.call_method1(intern!(py, "wait"), (event_loop, timeout)),
        }?;
        if !signalled.is_truthy()? {
            return Ok(PyList::empty(py).into_any());
        }
        selector.call_method0(intern!(py, "ready_now"))
    }
}

#[pymethods]
impl Scheduler {
    /// `loop.call_soon`.
    #[pyo3(signature = (callback, *args, context=None))]
    fn call_soon(
        &self,
        py: Python<'_>,
        callback: Py<PyAny>,
        args: Py<PyTuple>,
        context: Option<Py<PyAny>>,
    ) -> PyResult<Py<Handle>> {
        self.check_open()?;
        let handle = Py::new(py, self.handle(py, callback, args, context)?)?;
        let Some(turn) = self.turn.here() else {
            self.queue_from_elsewhere(handle.bind(py).as_any())?;
            return Ok(handle);
        };
        // What another thread queued before keeps its place ahead.
        self.take_threadsafe(py, turn)?;
        turn.push(handle.clone_ref(py).into_any());
        Ok(handle)
    }

    /// `loop.call_later`: `call_at(time() + delay, ...)`, through the loop's
    /// own `call_at` if it is not this scheduler's (a subclass's, a mock).
    #[pyo3(signature = (delay, callback, *args, context=None))]
    fn call_later(
        slf: &Bound<'_, Self>,
        py: Python<'_>,
        delay: Option<Bound<'_, PyAny>>,
        callback: Py<PyAny>,
        args: Py<PyTuple>,
        context: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let delay = delay.ok_or_else(|| PyTypeError::new_err("delay must not be None"))?;
        // `time() + delay`, as asyncio computes it: the delays it takes are
        // those a float adds with.
        let this = slf.get();
        let when = PyFloat::new(py, this.now(py)?).add(delay)?;
        let call_at = this.event_loop.bind(py).getattr(intern!(py, "call_at"))?;
        let ours = call_at
            .getattr(intern!(py, "__self__"))
            .is_ok_and(|owner| owner.is(slf));
        if ours {
            let timer = this.call_at(py, Some(when.extract()?), callback, args, context)?;
            return Ok(timer.into_any());
        }
        let mut positional = vec![when.into_any(), callback.into_bound(py)];
        positional.extend(args.bind(py).iter());
        let kwargs = PyDict::new(py);
        kwargs.set_item(intern!(py, "context"), context)?;
        Ok(call_at
            .call(PyTuple::new(py, positional)?, Some(&kwargs))?
            .unbind())
    }

    /// `loop.call_at`.
    #[pyo3(signature = (when, callback, *args, context=None))]
    fn call_at(
        &self,
        py: Python<'_>,
        when: Option<f64>,
        callback: Py<PyAny>,
        args: Py<PyTuple>,
        context: Option<Py<PyAny>>,
    ) -> PyResult<Py<TimerHandle>> {
        let when = when.ok_or_else(|| PyTypeError::new_err("when cannot be None"))?;
        if when.is_nan() {
            // It would never be due, and would hold back every timer after it.
            return Err(PyValueError::new_err("when cannot be NaN"));
        }
        self.check_open()?;
        let handle = self.handle(py, callback, args, context)?;
        let timer = PyClassInitializer::from(handle).add_subclass(TimerHandle {
            when,
            scheduled: AtomicBool::new(true),
            cancelled_timers: self.cancelled_timers.clone(),
        });
        let timer = Py::new(py, timer)?;
        match self.turn.here() {
            Some(turn) => turn.add_timer(when, timer.clone_ref(py)),
            None => self.queue_from_elsewhere(timer.bind(py).as_any())?,
        }
        Ok(timer)
    }

    /// `loop._add_callback`: queues a handle made elsewhere (an I/O
    /// callback of asyncio's, a signal's), unless it is cancelled.
    fn add_callback(&self, py: Python<'_>, handle: Bound<'_, PyAny>) -> PyResult<()> {
        let cancelled = match handle.cast::<Handle>() {
            Ok(ours) => ours.get().is_cancelled(),
            Err(_) => handle.getattr(intern!(py, "_cancelled"))?.is_truthy()?,
        };
        if !cancelled {
            let turn = self.turn.local()?;
            self.take_threadsafe(py, turn)?;
            turn.push(handle.unbind());
        }
        Ok(())
    }

    /// `loop._run_once`: one full turn of the loop. Polls (waiting until
    /// the next timer, or not at all if a callback is ready or the loop
    /// stops), then runs the callbacks ready now and the timers due.
    fn run_once(&self, py: Python<'_>) -> PyResult<()> {
        let turn = self.turn.local()?.clone();
        let turn = &*turn;
        let event_loop = self.event_loop.bind(py);
        turn.drop_cancelled(py);
        self.take_threadsafe(py, turn)?;
        let timeout = if turn.has_ready() || is_stopping(event_loop) {
            Some(0.0)
        } else {
            match turn.next_due() {
                Some(when) => Some((when - self.now(py)?).clamp(0.0, MAXIMUM_SELECT_TIMEOUT)),
                None => None,
            }
        };
        let events = self.select(event_loop, timeout)?;
        // The loop's `_process_events` also notices when shutdown lets the
        // shard stop (`_stopped`); a turn without events skips it otherwise.
        if events.len()? > 0 || !event_loop.getattr(intern!(py, "_stopped"))?.is_none() {
            event_loop.call_method1(intern!(py, "_process_events"), (events,))?;
        }
        self.take_threadsafe(py, turn)?;
        if turn.next_due().is_some() {
            turn.move_due(self.now(py)? + self.resolution);
        }
        // The callbacks queued by these run on the next turn.
        let count = turn.ready.borrow().len();
        let debug = self.debug.load(Relaxed);
        for _ in 0..count {
            let Some(handle) = turn.pop() else { break };
            let handle = handle.into_bound(py);
            if debug {
                event_loop.call_method1(intern!(py, "_run_debug"), (handle,))?;
            } else if let Ok(ours) = handle.cast::<Handle>() {
                Handle::run(ours)?;
            } else if !handle.getattr(intern!(py, "_cancelled"))?.is_truthy()? {
                handle.call_method0(intern!(py, "_run"))?;
            }
        }
        Ok(())
    }

    /// How many callbacks are ready and how many timers are scheduled
    /// (cancelled ones included, until the heap drops them).
    fn pending(&self) -> PyResult<(usize, usize)> {
        let turn = self.turn.local()?;
        let ready = turn.ready.borrow().len();
        let timers = turn.timers.borrow().len();
        Ok((ready, timers))
    }

    /// The loop closed: it takes no more callbacks, and those left are
    /// dropped (off the shard's thread, closing the shard drops them).
    fn close(&self) {
        self.closed.store(true, Relaxed);
        if let Ok(turn) = self.turn.local() {
            turn.clear();
        }
    }

    /// Follows the loop's debug mode.
    fn set_debug(&self, enabled: bool) {
        self.debug.store(enabled, Relaxed);
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.event_loop)?;
        visit.call(&self.threadsafe)?;
        visit.call(&self.driver)?;
        visit.call(&self.instance_dict)?;
        // The handles queued hold the loop: a loop dropped unclosed with
        // callbacks pending is a cycle through them. (Seen only from the
        // loop's own thread.)
        match self.turn.here() {
            Some(turn) => turn.visit(&visit),
            None => Ok(()),
        }
    }

    fn __clear__(&self) {
        if let Some(turn) = self.turn.here() {
            turn.clear();
        }
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Handle>()?;
    m.add_class::<TimerHandle>()?;
    m.add_class::<Scheduler>()
}

#[cfg(test)]
mod tests {
    use super::DueKey;
    use std::collections::BinaryHeap;

    #[test]
    fn the_heap_gives_the_earliest_timer_and_ties_in_the_order_made() {
        let timers = [(3.0, 0), (1.0, 1), (2.0, 2), (1.0, 3), (0.5, 4), (1.0, 5)];
        let mut heap: BinaryHeap<DueKey> = timers
            .iter()
            .map(|&(when, order)| DueKey { when, order })
            .collect();
        let mut popped = Vec::new();
        while let Some(key) = heap.pop() {
            popped.push(key.order);
        }
        assert_eq!(popped, [4, 1, 3, 5, 2, 0]);
    }

    #[test]
    fn a_timer_at_an_infinite_or_negative_time_keeps_its_place() {
        let keys = [f64::INFINITY, -1.0, 0.0, f64::NEG_INFINITY];
        let mut heap: BinaryHeap<DueKey> = keys
            .iter()
            .enumerate()
            .map(|(order, &when)| DueKey {
                when,
                order: order as u64,
            })
            .collect();
        let mut popped = Vec::new();
        while let Some(key) = heap.pop() {
            popped.push(key.when);
        }
        assert_eq!(popped, [f64::NEG_INFINITY, -1.0, 0.0, f64::INFINITY]);
    }
}
