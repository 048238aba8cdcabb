//! Stall detection: how long each shard has been running Python since it
//! last went back to its poll loop (Seastar's `blocked_reactor_notify_ms`).
//!
//! A shard's turn starts when it comes back into Python from its poll (the
//! driver's `poll`/`wait`) and ends when it next leaves for it; a task
//! step, a callback or a plain function served there that runs long keeps
//! the turn open. Each shard's [`Watch`] notes the start of the open turn,
//! counts the turns that passed the threshold, and names the plain
//! function being served; the watchdog thread (`watchdog.rs`) reads it from
//! outside and has `shardloop._stall` take the shard thread's Python stack
//! and report.
//!
//! Writing it costs a clock read and a few plain stores per turn, nothing
//! per call but a reference to the function served.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

/// The origin of the watches' clock.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

pub(crate) fn now_ns() -> u64 {
    u64::try_from(EPOCH.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One shard's turn, written by its thread only, read by the watchdog.
pub(crate) struct Watch {
    pub(crate) shard: usize,
    /// `threading.get_ident()` of the shard's thread.
    pub(crate) thread: u64,
    pub(crate) threshold_ns: u64,
    /// When the open turn began (ns from [`EPOCH`], never 0), or 0 when
    /// the shard is not in a turn.
    turn_since: AtomicU64,
    /// The plain function being served, if any.
    serving: Mutex<Option<Py<PyAny>>>,
    /// Shared with the runtime's `watches`, which read them after the
    /// shard has gone too.
    tally: Arc<Tally>,
    last_stall_ns: AtomicU64,
}

/// A shard's stall counters.
#[derive(Default)]
struct Tally {
    stalls: AtomicU64,
    worst_ns: AtomicU64,
}

impl Tally {
    /// (stalls, worst stall in seconds) so far.
    fn counts(&self) -> (u64, f64) {
        (
            self.stalls.load(Ordering::Relaxed),
            self.worst_ns.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }
}

/// The watches of one runtime's shards, for `stats()` and the watchdog:
/// each shard's watch while the shard is there, and its counters for good
/// (`stats()` read after the runtime stopped shows their last values).
/// Per runtime, not per process: a lock of the process's could be held by
/// one of its threads at a `fork`, and stay held in the child for good.
#[derive(Default)]
pub(crate) struct Watches(Mutex<Vec<Watched>>);

/// A shard, its watch while it is there, and its counters.
type Watched = (usize, Weak<Watch>, Arc<Tally>);

impl Watches {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Watched>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The watches whose shards are still there.
    pub(crate) fn live(&self) -> Vec<Arc<Watch>> {
        self.lock()
            .iter()
            .filter_map(|(_, w, _)| w.upgrade())
            .collect()
    }

    /// The stall counters of shard `shard`: (stalls, worst in seconds), or
    /// `None` when stall detection is off.
    pub(crate) fn counts(&self, shard: usize) -> Option<(u64, f64)> {
        self.lock()
            .iter()
            .find(|(id, _, _)| *id == shard)
            .map(|(_, _, tally)| tally.counts())
    }
}

impl Watch {
    /// The watch of shard `shard`, on this thread, kept in its runtime's
    /// `watches`.
    pub(crate) fn new(shard: usize, threshold: Duration, watches: &Watches) -> Arc<Self> {
        let watch = Arc::new(Self {
            shard,
            // SAFETY: `pthread_self` has no preconditions; CPython's
            // thread ident is this value.
            thread: unsafe { libc::pthread_self() } as u64,
            threshold_ns: u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX),
            turn_since: AtomicU64::new(0),
            serving: Mutex::new(None),
            tally: Arc::default(),
            last_stall_ns: AtomicU64::new(0),
        });
        watches
            .lock()
            .push((shard, Arc::downgrade(&watch), watch.tally.clone()));
        watch
    }

    /// The shard came back into Python: a turn begins.
    pub(crate) fn turn_begins(&self) {
        self.turn_since.store(now_ns().max(1), Ordering::Release);
    }

    /// The shard leaves Python for its poll loop (or its loop stops): the
    /// turn ends, and is counted if it was a stall.
    pub(crate) fn turn_ends(&self) {
        let since = self.turn_since.load(Ordering::Relaxed);
        if since == 0 {
            return;
        }
        let took = now_ns().saturating_sub(since);
        if took >= self.threshold_ns {
            let tally = &self.tally;
            tally
                .stalls
                .store(tally.stalls.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            self.last_stall_ns.store(took, Ordering::Relaxed);
            if took > tally.worst_ns.load(Ordering::Relaxed) {
                tally.worst_ns.store(took, Ordering::Relaxed);
            }
        }
        // Last, so that a watchdog that sees the turn end sees its length.
        self.turn_since.store(0, Ordering::Release);
    }

    /// Names `func` as the plain function being served (`None`: done).
    pub(crate) fn serving(&self, func: Option<Py<PyAny>>) {
        let old = std::mem::replace(
            &mut *self
                .serving
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            func,
        );
        // Released after the lock: a decref may run Python code.
        drop(old);
    }

    /// When the open turn began (ns on [`now_ns`]'s clock), or 0 when the
    /// shard is not in a turn.
    pub(crate) fn turn(&self) -> u64 {
        self.turn_since.load(Ordering::Acquire)
    }

    /// How long (ns) the last stall that ended lasted.
    pub(crate) fn last_stall_ns(&self) -> u64 {
        self.last_stall_ns.load(Ordering::Relaxed)
    }

    /// The plain function being served, if any.
    pub(crate) fn served(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.serving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|f| f.clone_ref(py))
    }
}
