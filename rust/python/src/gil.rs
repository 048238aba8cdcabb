//! Handing the GIL from shard to shard without sleeping on it.
//!
//! With the GIL, a shard that has work for Python must take the GIL from
//! whichever shard holds it. CPython's own hand-off parks the waiter on a
//! condition variable, and waking it costs several microseconds: more than
//! a whole cross-shard call. Shards therefore announce which of them holds
//! the GIL (between their attach and detach points), and a shard that wants
//! it spins in Rust, polling nothing but this word, until it is free, then
//! attaches at once. The spin is bounded: Python code can release the GIL
//! without going through these points (blocking I/O, `time.sleep`), so after
//! `SPIN_LIMIT` the shard falls back to CPython's hand-off.

use std::cell::Cell;
use std::hint::spin_loop;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

/// The shard (plus one) that last attached through [`detached`], or 0.
static HOLDER: AtomicUsize = AtomicUsize::new(0);

/// How long a shard spins for the GIL before it waits in CPython.
const SPIN_LIMIT: Duration = Duration::from_micros(100);

/// Spins before an overprovisioned shard starts yielding its core.
const SPINS_BEFORE_YIELD: u32 = 64;

thread_local! {
    /// Whether this thread's shard shares its core with other busy threads:
    /// it then yields the core while it waits for the GIL (the holder may be
    /// waiting for a core itself).
    static YIELD: Cell<bool> = const { Cell::new(false) };
}

/// Makes this thread yield its core while it waits for the GIL (see
/// `Builder::overprovisioned`).
pub(crate) fn set_overprovisioned(overprovisioned: bool) {
    YIELD.with(|y| y.set(overprovisioned));
}

/// Runs `f` with the GIL released, as shard `shard`, and takes the GIL back
/// when the shards that hold it let go of it.
pub(crate) fn detached<T: Send>(py: Python<'_>, shard: usize, f: impl FnOnce() -> T + Send) -> T {
    let me = shard + 1;
    HOLDER.store(0, Ordering::Release);
    let result = py.detach(move || {
        let result = f();
        claim(me);
        result
    });
    HOLDER.store(me, Ordering::Relaxed);
    result
}

fn claim(me: usize) {
    let polite = YIELD.with(Cell::get);
    let mut started: Option<Instant> = None;
    let mut spins = 0u32;
    loop {
        if HOLDER.load(Ordering::Relaxed) == 0
            && HOLDER
                .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            return;
        }
        if polite && spins >= SPINS_BEFORE_YIELD {
            std::thread::yield_now();
        } else {
            spin_loop();
        }
        spins += 1;
        if spins % 256 == 0 && started.get_or_insert_with(Instant::now).elapsed() >= SPIN_LIMIT {
            return;
        }
    }
}
