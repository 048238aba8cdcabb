//! The binding's one thread-local: what a thread keeps of the shards it
//! runs. Every other module reaches per-thread state through here.
//!
//! A thread usually runs one shard, but may keep shards of several runtimes
//! (one running at a time), so the state of each shard is a [`Shard`] and
//! the context names the active one. Nothing here is borrowed while Python
//! runs: Python code can run at any call into Python and at every return
//! from a detached stretch (deferred decrefs run `__del__` methods, which
//! may submit), so the cells hand out clones or are taken and put back.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use pyo3::prelude::*;

use crate::call::{CallKey, PyCall};
use crate::future::ShardFuture;

/// Makes a Python value (or error) from the output of a Rust task.
pub(crate) type Produce = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

/// What waits in the thread's inbox for the driver, which handles it with
/// the GIL after its wait (`Driver::run_arrived`).
pub(crate) enum Incoming {
    /// A call to serve here.
    Request(Box<PyCall>),
    /// A call of this shard, answered.
    Answered(Box<PyCall>),
    /// A Rust task finished: settle `future` with what `produce` makes.
    Settle {
        future: Py<ShardFuture>,
        produce: Produce,
    },
    /// Something of this shard that has Python work to do: a transport
    /// whose bytes arrived, say.
    Work(Rc<dyn PythonWork>),
}

/// What the Rust side of an object readied for its Python side: the driver
/// runs it with the GIL, in the pass after the poll that found it.
pub(crate) trait PythonWork {
    /// Does the work. Only what stops a loop (`SystemExit`,
    /// `KeyboardInterrupt`) comes out: other errors are the object's to
    /// report.
    fn run(self: Rc<Self>, py: Python<'_>) -> PyResult<()>;
}

/// Work that must be done when the shard's turn ends, before it looks for
/// more: the connection layer registers connections with bytes to send.
pub(crate) trait EndOfTurn {
    /// Runs on the shard's thread, without touching Python objects:
    /// usually with the GIL released (the driver runs it before it waits),
    /// and with it held for the last turn of a loop that stops.
    fn end_turn(self: Rc<Self>);
}

/// One shard whose loop lives on this thread.
pub(crate) struct Shard {
    pub(crate) id: usize,
    pub(crate) count: usize,
    /// What the runtime's shards share (group and stall counters).
    pub(crate) board: Arc<crate::board::Board>,
    /// The calls of each service group in flight from here, and waiting.
    pub(crate) admission: RefCell<crate::call::group::Admission>,
    /// The shard's stall watch, when stall detection is on.
    watch: Option<Arc<crate::stall::Watch>>,
    /// The core's handle of the shard; `None` once the driver is closed.
    driver: RefCell<Option<Rc<shardloop_core::embed::Driver>>>,
    /// Numbers this shard's calls (for the targets' running tasks).
    next_call: Cell<u64>,
    /// Set while the shard's event loop runs.
    activation: RefCell<Option<Activation>>,
    /// The event loop's ready queue and timers (see `turn/mod.rs`).
    pub(crate) turn: Rc<crate::turn::LoopQueues>,
}

struct Activation {
    _guard: shardloop_core::embed::Activation,
    /// The shard that was active before (a loop run inside another's).
    previous: Option<Rc<Shard>>,
    event_loop: Py<PyAny>,
}

/// Per-thread state; see the module's comment.
pub(crate) struct Context {
    /// The shard whose event loop runs now.
    active: RefCell<Option<Rc<Shard>>>,
    /// How many shard drivers this thread holds.
    pub(crate) shards_here: Cell<usize>,
    /// What arrived while the poll loop ran without the GIL.
    inbox: RefCell<Vec<Incoming>>,
    /// Tasks running calls for other shards, so that a caller's
    /// cancellation can reach them.
    pub(crate) running: RefCell<HashMap<CallKey, Py<PyAny>>>,
    /// What runs when the turn ends (see [`EndOfTurn`]).
    end_of_turn: RefCell<Vec<Rc<dyn EndOfTurn>>>,
    /// Whether this thread's shard shares its core with other busy threads:
    /// it then yields the core while it waits for the GIL.
    pub(crate) overprovisioned: Cell<bool>,
    /// Set while this thread runs a shard and is (or is about to be)
    /// attached to Python; read by other threads at interpreter exit (see
    /// `gil.rs`, which creates and registers it).
    pub(crate) presence: OnceCell<Arc<AtomicBool>>,
    /// Set on the thread that finalizes the interpreter.
    pub(crate) finalizer: Cell<bool>,
}

thread_local! {
    static CONTEXT: Context = Context {
        active: RefCell::new(None),
        shards_here: Cell::new(0),
        inbox: RefCell::new(Vec::new()),
        running: RefCell::new(HashMap::new()),
        end_of_turn: RefCell::new(Vec::new()),
        overprovisioned: Cell::new(false),
        presence: OnceCell::new(),
        finalizer: Cell::new(false),
    };
}

/// Runs `f` with this thread's context.
///
/// # Panics
/// While the thread's locals are being destroyed (see [`try_with`]).
pub(crate) fn with<R>(f: impl FnOnce(&Context) -> R) -> R {
    CONTEXT.with(f)
}

/// Like [`with`], or `None` while the thread exits and its context is gone
/// (for code that a destructor can reach).
pub(crate) fn try_with<R>(f: impl FnOnce(&Context) -> R) -> Option<R> {
    CONTEXT.try_with(f).ok()
}

/// The shard whose loop runs on this thread now.
pub(crate) fn active() -> Option<Rc<Shard>> {
    with(|c| c.active.borrow().clone())
}

/// The running event loop of this thread's active shard.
pub(crate) fn running_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    active()
        .and_then(|shard| shard.event_loop(py))
        .ok_or_else(crate::errors::not_on_shard)
}

/// Parks `incoming` for the driver (this runs inside the core's poll
/// loop, without the GIL) and makes the driver's wait return.
pub(crate) fn arrive(incoming: Incoming) {
    with(|c| c.inbox.borrow_mut().push(incoming));
    shardloop_core::embed::wake_driver();
}

/// Whether anything waits in the inbox.
pub(crate) fn has_arrived() -> bool {
    with(|c| !c.inbox.borrow().is_empty())
}

/// Takes what waits in the inbox.
pub(crate) fn take_arrived() -> Vec<Incoming> {
    with(|c| std::mem::take(&mut *c.inbox.borrow_mut()))
}

/// Puts back, first in line, what was taken from the inbox and not
/// handled.
pub(crate) fn put_back(mut unhandled: Vec<Incoming>) {
    with(|c| {
        let mut inbox = c.inbox.borrow_mut();
        unhandled.append(&mut inbox);
        *inbox = unhandled;
    });
}

/// Has `future` (a future of this shard) settled with what
/// `produce` makes, by the driver at its next look at the inbox: how a
/// Rust task hands its output to Python.
pub(crate) fn settle_later(future: Py<ShardFuture>, produce: Produce) {
    if shardloop_core::shard_id().is_none() {
        // No shard runs here any more (a connection closed after its
        // runtime): nothing will look, and nothing may carry over to the
        // next runtime of this thread.
        return;
    }
    let parked = try_with(|c| {
        c.inbox
            .borrow_mut()
            .push(Incoming::Settle { future, produce })
    });
    if parked.is_some() {
        shardloop_core::embed::wake_driver();
    }
}

/// Has [`EndOfTurn::end_turn`] of `work` run when this turn ends.
pub(crate) fn at_end_of_turn(work: Rc<dyn EndOfTurn>) {
    with(|c| c.end_of_turn.borrow_mut().push(work));
}

/// Runs what was registered for the end of this turn (the driver calls it
/// before it looks for more work, with the GIL released; a loop that stops
/// calls it once more).
pub(crate) fn end_turn() {
    // Most turns register nothing: look before taking the list out.
    let Some(mut due) = try_with(|c| {
        let mut list = c.end_of_turn.borrow_mut();
        (!list.is_empty()).then(|| std::mem::take(&mut *list))
    })
    .flatten() else {
        return;
    };
    for work in due.drain(..) {
        work.end_turn();
    }
    // Keep the list's allocation for the next turn.
    let _ = try_with(|c| {
        let mut list = c.end_of_turn.borrow_mut();
        if list.is_empty() {
            *list = due;
        }
    });
}

/// Drops what the thread's shards left behind once the last of them is
/// closed: nothing carries over to the next runtime of this thread.
pub(crate) fn forget_shards() {
    let left = try_with(|c| {
        (
            std::mem::take(&mut *c.inbox.borrow_mut()),
            std::mem::take(&mut *c.running.borrow_mut()),
            std::mem::take(&mut *c.end_of_turn.borrow_mut()),
        )
    });
    drop(left);
}

impl Shard {
    pub(crate) fn new(
        driver: shardloop_core::embed::Driver,
        watch: Option<Arc<crate::stall::Watch>>,
        board: Arc<crate::board::Board>,
    ) -> Self {
        Self {
            id: driver.shard_id(),
            count: driver.shard_count(),
            watch,
            admission: RefCell::new(crate::call::group::Admission::new(
                board.pairs.clone(),
                driver.shard_id(),
                driver.shard_count(),
            )),
            board,
            driver: RefCell::new(Some(Rc::new(driver))),
            next_call: Cell::new(0),
            activation: RefCell::new(None),
            turn: Rc::default(),
        }
    }

    /// The core's driver, unless the shard was closed.
    pub(crate) fn driver(&self) -> Option<Rc<shardloop_core::embed::Driver>> {
        self.driver.borrow().clone()
    }

    /// A fresh number for a call of this shard.
    pub(crate) fn next_call(&self) -> u64 {
        let id = self.next_call.get();
        self.next_call.set(id + 1);
        id
    }

    /// The shard's event loop, while it runs.
    pub(crate) fn event_loop<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        self.activation
            .borrow()
            .as_ref()
            .map(|a| a.event_loop.clone_ref(py).into_bound(py))
    }

    /// Makes this shard the thread's active one (and the core's current
    /// one) while `event_loop` runs. Does nothing if it is active already.
    pub(crate) fn activate(self: &Rc<Self>, event_loop: Py<PyAny>) {
        let Some(driver) = self.driver() else { return };
        if self.activation.borrow().is_some() {
            return;
        }
        let guard = driver.activate();
        let previous = with(|c| c.active.replace(Some(self.clone())));
        *self.activation.borrow_mut() = Some(Activation {
            _guard: guard,
            previous,
            event_loop,
        });
    }

    /// A turn of the shard's loop begins: it came back into Python.
    pub(crate) fn turn_begins(&self) {
        if let Some(watch) = &self.watch {
            watch.turn_begins();
        }
    }

    /// The turn ends: the shard leaves Python for its poll loop.
    pub(crate) fn turn_ends(&self) {
        if let Some(watch) = &self.watch {
            watch.turn_ends();
        }
    }

    /// Names the plain function served now, for stall reports (`None`:
    /// done).
    pub(crate) fn serving(&self, func: Option<&Py<PyAny>>, py: Python<'_>) {
        if let Some(watch) = &self.watch {
            watch.serving(func.map(|f| f.clone_ref(py)));
        }
    }

    /// Ends the activation, if any. What the last turn registered (bytes
    /// written to connections) is still done; the loop object is released
    /// last, with nothing borrowed.
    pub(crate) fn deactivate(&self) {
        let activation = self.activation.borrow_mut().take();
        self.turn_ends();
        if let Some(activation) = activation {
            end_turn();
            let previous = activation.previous.clone();
            let _ = try_with(|c| c.active.replace(previous));
            drop(activation);
        }
    }

    /// Deactivates the shard and lets go of the core's driver; returns
    /// whether it was open.
    pub(crate) fn close(&self) -> bool {
        self.deactivate();
        self.turn.clear();
        let driver = self.driver.borrow_mut().take();
        driver.is_some()
    }
}
