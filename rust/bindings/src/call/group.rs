//! Step 1's admission: service groups bound the calls in flight from one
//! shard to another (Seastar's `smp_service_group`).
//!
//! Every call belongs to a group: `ServiceGroup.submit_to`'s, or the
//! default group for `shard.submit_to`. A shard lets at most
//! `max_inflight` calls of a group be in flight to each target (itself
//! included); one more waits here, on the sender, in order and unsent,
//! until an answer of the same group and target comes back
//! ([`release`]). The caller's `await` is then its back-pressure, and a
//! flood of un-awaited calls stays a queue of waiting calls on the sender
//! instead of messages in the rings and work the target must get through
//! before its own timers.
//!
//! The state of a pair (group, target) lives in the sending shard and
//! is only touched on its thread; its counters are mirrored in a
//! [`PairStats`] that `stats()` reads from any shard.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::settle::settle;
use super::PyCall;
use crate::errors;

/// Names a group; the default group is 0.
pub(crate) type GroupId = u32;

/// How many calls of the default group may be in flight from a shard to
/// another. Large enough that no ordinary program meets it (1,000 calls
/// in flight through `gather` run at full speed well below it), small
/// enough that a flood of un-awaited calls waits on its sender instead of
/// filling the target's rings (see benches/README.md, "Service groups").
pub(crate) const DEFAULT_MAX_INFLIGHT: usize = 4096;

static NEXT_GROUP: AtomicU32 = AtomicU32::new(1);

/// What a group is: the same on every shard.
#[derive(Clone)]
pub(crate) struct GroupSpec {
    id: GroupId,
    name: Arc<str>,
    max_inflight: usize,
}

impl GroupSpec {
    /// A new group, with a number of its own; `name` defaults to
    /// `group-<number>`.
    pub(crate) fn new(max_inflight: usize, name: Option<String>) -> Self {
        let id = NEXT_GROUP.fetch_add(1, Ordering::Relaxed);
        let name = name.unwrap_or_else(|| format!("group-{id}"));
        Self {
            id,
            name: Arc::from(name),
            max_inflight,
        }
    }

    pub(crate) fn id(&self) -> GroupId {
        self.id
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn max_inflight(&self) -> usize {
        self.max_inflight
    }
}

/// The group of plain `shard.submit_to`.
pub(crate) static DEFAULT_GROUP: LazyLock<GroupSpec> = LazyLock::new(|| GroupSpec {
    id: 0,
    name: Arc::from("default"),
    max_inflight: DEFAULT_MAX_INFLIGHT,
});

/// A call that waits for room in its group.
struct Waiting {
    call: Box<PyCall>,
    since: Instant,
}

/// One group's calls from this shard to one target.
struct Pair {
    in_flight: usize,
    waiting: VecDeque<Waiting>,
    /// The ids of the calls in `waiting` that still want to be sent (a
    /// cancelled one leaves, and is skipped when its turn comes).
    wanted: HashSet<u64>,
    stats: Arc<PairStats>,
}

/// The admission state of one shard: its pairs, by group and target.
pub(crate) struct Admission {
    pairs: Arc<Pairs>,
    origin: usize,
    count: usize,
    default: Vec<Option<Pair>>,
    groups: HashMap<GroupId, Vec<Option<Pair>>>,
}

impl Admission {
    /// The state of shard `origin` of `count` shards, whose pairs' counters
    /// go to its runtime's `pairs`.
    pub(crate) fn new(pairs: Arc<Pairs>, origin: usize, count: usize) -> Self {
        Self {
            pairs,
            origin,
            count,
            default: Vec::new(),
            groups: HashMap::new(),
        }
    }

    fn pair(&mut self, group: &GroupSpec, target: usize) -> &mut Pair {
        let (origin, count) = (self.origin, self.count);
        let all = &self.pairs;
        let pairs = if group.id == 0 {
            &mut self.default
        } else {
            self.groups.entry(group.id).or_default()
        };
        if pairs.len() < count {
            pairs.resize_with(count, || None);
        }
        pairs[target].get_or_insert_with(|| Pair {
            in_flight: 0,
            waiting: VecDeque::new(),
            wanted: HashSet::new(),
            stats: all.register(origin, group, target),
        })
    }

    fn existing(&mut self, group: GroupId, target: usize) -> Option<&mut Pair> {
        let pairs = if group == 0 {
            &mut self.default
        } else {
            self.groups.get_mut(&group)?
        };
        pairs.get_mut(target)?.as_mut()
    }
}

/// Sends `call` to `target` if the group has room for it, or queues it.
/// Nothing is queued or counted if sending fails.
pub(crate) fn admit(
    admission: &RefCell<Admission>,
    group: &GroupSpec,
    target: usize,
    call: Box<PyCall>,
) -> PyResult<()> {
    {
        let mut admission = admission.borrow_mut();
        let pair = admission.pair(group, target);
        if pair.in_flight >= group.max_inflight {
            pair.wanted.insert(call.id);
            pair.waiting.push_back(Waiting {
                call,
                since: Instant::now(),
            });
            pair.stats.set_waiting(pair.wanted.len());
            return Ok(());
        }
        pair.in_flight += 1;
    }
    // Nothing is borrowed while it is sent: a send that fails drops the
    // call, whose arguments' `__del__` may submit again.
    let sent = shardloop_core::embed::send(target, call);
    let mut admission = admission.borrow_mut();
    let pair = admission.pair(group, target);
    match sent {
        Ok(()) => {
            pair.stats.sent_one(pair.in_flight);
            Ok(())
        }
        Err(err) => {
            pair.in_flight -= 1;
            Err(errors::call_error(err))
        }
    }
}

/// Withdraws a waiting call whose caller cancelled it; returns whether it
/// was waiting (and was never sent).
pub(crate) fn withdraw(
    admission: &RefCell<Admission>,
    group: GroupId,
    target: usize,
    id: u64,
) -> bool {
    let mut dropped = Vec::new();
    let withdrawn = {
        let mut admission = admission.borrow_mut();
        let Some(pair) = admission.existing(group, target) else {
            return false;
        };
        let withdrawn = pair.wanted.remove(&id);
        if withdrawn {
            pair.stats.set_waiting(pair.wanted.len());
            pair.compact(&mut dropped);
        }
        withdrawn
    };
    // Released with nothing borrowed: a decref may run Python code.
    drop(dropped);
    withdrawn
}

/// An answer of `group` came back from `target`: makes room for the next
/// waiting call, and sends it. A call that cannot be sent (the runtime
/// stopped taking calls) fails its caller with the error, and the next one
/// is tried. Nothing is borrowed while Python runs (withdrawn calls are
/// dropped, and futures settled, after the borrow ends).
pub(crate) fn release(
    py: Python<'_>,
    admission: &RefCell<Admission>,
    group: GroupId,
    target: usize,
) {
    let mut dropped = Vec::new();
    let mut next = {
        let mut admission = admission.borrow_mut();
        let Some(pair) = admission.existing(group, target) else {
            return;
        };
        pair.in_flight = pair.in_flight.saturating_sub(1);
        pair.stats.set_in_flight(pair.in_flight);
        pair.take_next(&mut dropped)
    };
    while let Some(call) = next.take() {
        let future = call.future.as_ref().map(|f| f.clone_ref(py));
        let sent = shardloop_core::embed::send(target, call);
        let mut admission = admission.borrow_mut();
        let Some(pair) = admission.existing(group, target) else {
            return;
        };
        // Counted as waiting until now, so that a drain that looks in
        // between sees it somewhere.
        pair.stats.set_waiting(pair.wanted.len());
        match sent {
            Ok(()) => pair.stats.sent_one(pair.in_flight),
            Err(err) => {
                pair.in_flight -= 1;
                pair.stats.set_in_flight(pair.in_flight);
                next = pair.take_next(&mut dropped);
                drop(admission);
                if let Some(future) = future {
                    let failed = settle(py, future.bind(py), Err(errors::call_error(err)), None);
                    if let Some(callbacks) = failed {
                        let _ = callbacks.run(py);
                    }
                }
            }
        }
    }
    drop(dropped);
}

impl Pair {
    /// The next waiting call that is still wanted, counted in flight;
    /// withdrawn ones met on the way go to `dropped`.
    fn take_next(&mut self, dropped: &mut Vec<Waiting>) -> Option<Box<PyCall>> {
        while let Some(waiting) = self.waiting.pop_front() {
            if self.wanted.remove(&waiting.call.id) {
                self.in_flight += 1;
                self.stats.waited_one(waiting.since.elapsed().as_nanos());
                return Some(waiting.call);
            }
            dropped.push(waiting);
        }
        None
    }

    /// Drops the withdrawn calls from the queue once they are most of it
    /// (so that callers who give up cannot grow it for good, at a cost
    /// that stays constant per call); they go to `dropped`.
    fn compact(&mut self, dropped: &mut Vec<Waiting>) {
        if self.waiting.len() >= 64 && self.wanted.len() < self.waiting.len() / 2 {
            let wanted = &self.wanted;
            let (keep, gone): (VecDeque<Waiting>, VecDeque<Waiting>) = self
                .waiting
                .drain(..)
                .partition(|w| wanted.contains(&w.call.id));
            self.waiting = keep;
            dropped.extend(gone);
        }
    }
}

/// The counters of one pair, for `stats()`: written by the sending shard
/// only (plain loads and stores), read by any.
pub(crate) struct PairStats {
    group: Arc<str>,
    max_inflight: usize,
    origin: usize,
    target: usize,
    in_flight: AtomicUsize,
    waiting: AtomicUsize,
    /// The runtime's count of waiting calls, which this pair's adds to.
    all_waiting: Arc<AtomicUsize>,
    sent: AtomicU64,
    waited: AtomicU64,
    wait_ns: AtomicU64,
    max_wait_ns: AtomicU64,
}

/// The counters of one runtime's pairs. Per runtime, not per process: a
/// lock of the process's could be held by one of its threads at a `fork`,
/// and stay held in the child for good.
#[derive(Default)]
pub(crate) struct Pairs {
    list: Mutex<Vec<Arc<PairStats>>>,
    /// Calls waiting in every pair's queue, for the drain.
    waiting: Arc<AtomicUsize>,
}

impl Pairs {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Arc<PairStats>>> {
        self.list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The counters of a new pair.
    fn register(&self, origin: usize, group: &GroupSpec, target: usize) -> Arc<PairStats> {
        let stats = Arc::new(PairStats {
            group: group.name.clone(),
            max_inflight: group.max_inflight,
            origin,
            target,
            in_flight: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            all_waiting: self.waiting.clone(),
            sent: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            wait_ns: AtomicU64::new(0),
            max_wait_ns: AtomicU64::new(0),
        });
        self.list().push(stats.clone());
        stats
    }

    /// Whether any call waits in a group's queue (a call leaves it only
    /// once it is sent).
    pub(crate) fn any_waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }
}

/// Adds `by` to a counter that only this thread writes.
fn add(counter: &AtomicU64, by: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).saturating_add(by),
        Ordering::Relaxed,
    );
}

impl PairStats {
    fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n, Ordering::Relaxed);
    }

    fn set_waiting(&self, n: usize) {
        let was = self.waiting.swap(n, Ordering::AcqRel);
        if n > was {
            self.all_waiting.fetch_add(n - was, Ordering::AcqRel);
        } else {
            self.all_waiting.fetch_sub(was - n, Ordering::AcqRel);
        }
    }

    fn sent_one(&self, in_flight: usize) {
        add(&self.sent, 1);
        self.set_in_flight(in_flight);
    }

    fn waited_one(&self, nanos: u128) {
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX);
        add(&self.waited, 1);
        add(&self.wait_ns, nanos);
        if nanos > self.max_wait_ns.load(Ordering::Relaxed) {
            self.max_wait_ns.store(nanos, Ordering::Relaxed);
        }
    }
}

/// The counters of a runtime's `pairs`, one dict per group and ordered
/// pair of shards that has sent a call.
pub(crate) fn stats<'py>(py: Python<'py>, pairs: &Pairs) -> PyResult<Bound<'py, PyList>> {
    let mut pairs: Vec<Arc<PairStats>> = pairs.list().clone();
    pairs.sort_by(|a, b| (&a.group, a.origin, a.target).cmp(&(&b.group, b.origin, b.target)));
    let list = PyList::empty(py);
    for s in pairs {
        let d = PyDict::new(py);
        d.set_item("group", &*s.group)?;
        d.set_item("from", s.origin)?;
        d.set_item("to", s.target)?;
        d.set_item("max_inflight", s.max_inflight)?;
        d.set_item("in_flight", s.in_flight.load(Ordering::Relaxed))?;
        d.set_item("waiting", s.waiting.load(Ordering::Relaxed))?;
        d.set_item("sent", s.sent.load(Ordering::Relaxed))?;
        d.set_item("waited", s.waited.load(Ordering::Relaxed))?;
        d.set_item(
            "wait_seconds",
            s.wait_ns.load(Ordering::Relaxed) as f64 / 1e9,
        )?;
        d.set_item(
            "max_wait_seconds",
            s.max_wait_ns.load(Ordering::Relaxed) as f64 / 1e9,
        )?;
        list.append(d)?;
    }
    Ok(list)
}
