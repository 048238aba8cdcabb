//! Python calls between shards: a call's whole life, in three steps.
//!
//! 1. [`send`]: `submit_to` on the origin makes a [`PyCall`] and sends it
//!    through the core's request ring (a call to the origin itself is
//!    served at once, through the same serve and settle steps).
//! 2. [`serve`]: on the target the core runs the message, which only parks
//!    it in the thread's inbox (the poll loop runs without the GIL); the
//!    shard's driver then runs the inbox with the GIL held
//!    ([`run_arrived`]): a plain function's result is answered at once, a
//!    coroutine becomes a task of the target's loop and is answered when it
//!    is done. The answer goes back through the core's response ring.
//! 3. [`settle`]: back on the origin the answer is parked in the inbox too,
//!    and `run_arrived` completes the caller's asyncio future on its own
//!    loop, so no `call_soon_threadsafe` is involved anywhere.
//!
//! This file holds the types the steps share.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

pub(crate) mod send;
pub(crate) mod serve;
pub(crate) mod settle;

/// Names a call on its target: the runtime, the origin shard, the call id
/// (ids are counted per shard, and a thread may run shards of several
/// runtimes in turn).
pub(crate) type CallKey = (u64, usize, u64);

/// Makes a Python value (or error) from the output of a Rust task.
pub(crate) type Produce = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

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

/// One call on its way: out with its request, back with its outcome.
pub(crate) struct PyCall {
    pub(crate) origin: usize,
    pub(crate) target: usize,
    pub(crate) id: u64,
    /// Taken, and dropped, on the target.
    pub(crate) request: Option<Request>,
    /// The caller's future; only touched on the origin.
    pub(crate) future: Option<Py<PyAny>>,
    /// The future's done-callback that sends the cancel (see
    /// `send::CancelOnDone`); taken off the future when the answer comes.
    pub(crate) hook: Option<Py<PyAny>>,
    /// Written on the target, read on the origin.
    pub(crate) outcome: Option<PyResult<Py<PyAny>>>,
}

/// What waits in a shard thread's inbox for its driver.
pub(crate) enum Incoming {
    /// A call to serve here.
    Request(Box<PyCall>),
    /// A call of this shard, answered.
    Answered(Box<PyCall>),
    /// A Rust task finished: settle `future` with what `produce` makes.
    Settle { future: Py<PyAny>, produce: Produce },
}
