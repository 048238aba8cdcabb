//! Python calls between shards: a call's whole life, in three steps (the
//! steps of ARCHITECTURE.md's table are numbered the same way).
//!
//! 1. [`send`]: `submit_to` on the origin makes a [`PyCall`] and hands it
//!    to the core, which carries it on the request ring (a call to the
//!    origin itself goes straight to its inbox, then through the same serve
//!    and settle steps).
//! 2. [`serve`]: on the target the core runs the message without the GIL,
//!    which only parks it in the thread's inbox (`context::arrive`); the
//!    driver then hands it, with the GIL, to `serve::serve`: a plain
//!    function's outcome is answered at once, a coroutine becomes a task of
//!    the target's loop and is answered when it is done. The answer goes
//!    back on the core's response ring.
//! 3. [`settle`]: back on the origin the answer is parked in the inbox too,
//!    and the driver hands it to `settle::settle_answered`, which completes
//!    the caller's future (a [`crate::future::ShardFuture`]) and resumes
//!    whoever awaits it in the same pass: no `call_soon_threadsafe`, and no
//!    turn of the event loop.
//!
//! Before step 1 sends a call, its service group admits it
//! ([`group::admit`]) or keeps it waiting on the origin; each answer
//! makes room for the next ([`group::release`]).
//!
//! This file holds the types the steps share.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

pub(crate) mod group;
pub(crate) mod send;
pub(crate) mod serve;
pub(crate) mod settle;

/// Names a call on its target: the runtime, the origin shard, the call id
/// (ids are counted per shard, and a thread may run shards of several
/// runtimes in turn).
pub(crate) type CallKey = (u64, usize, u64);

/// What a message asks of its target.
pub(crate) enum Request {
    /// Call `func(*args, **kwargs)`.
    Call {
        func: Py<PyAny>,
        args: Py<PyTuple>,
        kwargs: Option<Py<PyDict>>,
    },
    /// Cancel the task that runs the origin's call of the same id.
    Cancel,
}

/// One call on its way: out with its request, back with its outcome.
pub(crate) struct PyCall {
    pub(crate) origin: usize,
    pub(crate) target: usize,
    pub(crate) id: u64,
    /// The service group a call counts in (see [`group`]); `None` for a
    /// cancel, which counts in none.
    pub(crate) group: Option<group::GroupId>,
    /// Taken, and dropped, on the target.
    pub(crate) request: Option<Request>,
    /// The caller's future; only touched on the origin.
    pub(crate) future: Option<Py<crate::future::ShardFuture>>,
    /// Written on the target, read on the origin.
    pub(crate) outcome: Option<PyResult<Py<PyAny>>>,
}
