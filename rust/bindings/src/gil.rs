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
//!
//! Free-threaded, there is no GIL to hand off, and the shards must not take
//! turns at all: the hand-off is skipped whenever the interpreter runs
//! without the GIL ([`GIL_ENABLED`]), and the shards run Python at once, side
//! by side.
//!
//! It is also where a shard thread re-enters Python, so it is where shard
//! threads stop re-entering it when the interpreter is about to finalize
//! ([`prepare_exit`]). CPython ends a thread that asks for the interpreter
//! during finalization with `pthread_exit`, whose forced unwinding through
//! Rust frames aborts the process; a shard thread parks there instead.

use std::hint::spin_loop;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::context;

/// The shard (plus one) that last attached through [`detached`], or 0.
static HOLDER: AtomicUsize = AtomicUsize::new(0);

/// Whether the interpreter runs with the GIL, as last seen when a shard was
/// installed (a free-threaded CPython turns the GIL on at run time when an
/// extension that needs it is imported). Wrong only for a moment after
/// such an import, and harmlessly: the shards then wait in CPython's own
/// hand-off, which is correct, only slower.
static GIL_ENABLED: AtomicBool = AtomicBool::new(true);

/// How long a shard spins for the GIL before it waits in CPython.
const SPIN_LIMIT: Duration = Duration::from_micros(100);

/// Spins before an overprovisioned shard starts yielding its core.
const SPINS_BEFORE_YIELD: u32 = 64;

/// Set by [`prepare_exit`]: shard threads no longer enter Python.
static EXITING: AtomicBool = AtomicBool::new(false);

/// Every shard thread's presence flag (see [`with_presence`]), with the thread's
/// kernel id (to tell one running Python from one blocked in a call).
static PRESENT: Mutex<Vec<(Weak<AtomicBool>, libc::pid_t)>> = Mutex::new(Vec::new());

/// Runs `f` with this thread's presence flag (see
/// [`crate::context::Context::presence`]), made and registered with
/// [`PRESENT`] on first use. (Borrowed, not cloned: it is used on every
/// detach of a shard's turn.)
fn with_presence<R>(f: impl FnOnce(&Arc<AtomicBool>) -> R) -> R {
    context::with(|c| {
        f(c.presence.get_or_init(|| {
            let flag = Arc::new(AtomicBool::new(false));
            PRESENT
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                // SAFETY: `gettid` has no preconditions and cannot fail.
                .push((Arc::downgrade(&flag), unsafe { libc::gettid() }));
            flag
        }))
    })
}

fn set_present(present: bool) {
    with_presence(|flag| flag.store(present, Ordering::SeqCst));
}

/// Makes this thread yield its core while it waits for the GIL (see
/// `Builder::overprovisioned`).
pub(crate) fn set_overprovisioned(overprovisioned: bool) {
    context::with(|c| c.overprovisioned.set(overprovisioned));
}

/// Counts a shard driver installed on this (attached) thread, and looks
/// again whether the interpreter runs with the GIL.
pub(crate) fn enter_shard(py: Python<'_>) {
    GIL_ENABLED.store(gil_enabled(py), Ordering::Relaxed);
    if context::with(|c| c.shards_here.replace(c.shards_here.get() + 1)) == 0 {
        set_present(true);
    }
}

/// `sys._is_gil_enabled()`, and `true` on interpreters that do not have it.
fn gil_enabled(py: Python<'_>) -> bool {
    py.import("sys")
        .and_then(|sys| sys.call_method0("_is_gil_enabled"))
        .and_then(|enabled| enabled.extract())
        .unwrap_or(true)
}

/// Undoes [`enter_shard`] when the driver is closed; returns whether it was
/// this thread's last shard.
pub(crate) fn leave_shard() -> bool {
    let before = context::with(|c| c.shards_here.replace(c.shards_here.get().saturating_sub(1)));
    if before == 1 {
        set_present(false);
    }
    before <= 1
}

/// Announces that this thread is about to attach to Python; `false` (and
/// no announcement) if the interpreter is exiting. The announcement and
/// the check are Dekker's handshake with [`prepare_exit`]: either this
/// thread sees `EXITING`, or `prepare_exit` sees the thread present and
/// waits for it to leave.
pub(crate) fn may_enter() -> bool {
    with_presence(|presence| {
        presence.store(true, Ordering::SeqCst);
        if EXITING.load(Ordering::SeqCst) && !context::with(|c| c.finalizer.get()) {
            presence.store(false, Ordering::SeqCst);
            false
        } else {
            true
        }
    })
}

/// Registers this thread's presence flag now (see [`with_presence`]), on a
/// thread that will enter Python later at a moment of its own choosing:
/// registering takes a process-wide lock, and a lock held at a `fork` stays
/// held for good in the child, so it had better be taken while nothing
/// forks (a watchdog that reports a stall does so exactly while its shard
/// is busy, in a `fork` say).
pub(crate) fn register_thread() {
    with_presence(|_| ());
}

/// Runs `f` with Python on a thread that is not a shard (a watchdog),
/// unless the interpreter is exiting; its presence is announced while it
/// runs, so that [`prepare_exit`] waits for it.
pub(crate) fn attached_unless_exiting<R>(f: impl FnOnce(Python<'_>) -> R) -> Option<R> {
    if !may_enter() {
        return None;
    }
    let result = Python::attach(f);
    set_present(false);
    Some(result)
}

/// Blocks this thread for good, outside Python: the interpreter is exiting
/// and the process ends with the thread parked here.
fn park_for_good() -> ! {
    loop {
        std::thread::park();
    }
}

/// Carries a closure of this thread (one that holds a shard's `!Send`
/// state) across `Python::detach`.
struct OnThisThread<F>(F);

// SAFETY: `Python::detach` runs its closure synchronously on the calling
// thread and returns before the caller continues, so the wrapped closure
// (and the `!Send` state it holds) never reaches another thread.
unsafe impl<F> Send for OnThisThread<F> {}

impl<F> OnThisThread<F> {
    /// The wrapped closure. (A method, so the `detach` closure captures the
    /// whole wrapper, not the `!Send` field.)
    fn into_inner(self) -> F {
        self.0
    }
}

/// Runs `f` with the GIL released, as shard `shard`, and takes the GIL back
/// when the shards that hold it let go of it (at once when the interpreter
/// has no GIL). If the interpreter started exiting meanwhile, the thread
/// parks instead of taking it back.
///
/// `f` runs on this thread and may hold the shard's `!Send` state; it must
/// not touch Python objects (it runs without the GIL).
pub(crate) fn detached<T: Send>(py: Python<'_>, shard: usize, f: impl FnOnce() -> T) -> T {
    if !GIL_ENABLED.load(Ordering::Relaxed) {
        return detached_exit_aware(py, f);
    }
    let me = shard + 1;
    HOLDER.store(0, Ordering::Release);
    set_present(false);
    let f = OnThisThread(f);
    let result = py.detach(move || {
        let result = f.into_inner()();
        if !may_enter() {
            park_for_good();
        }
        claim(me);
        result
    });
    HOLDER.store(me, Ordering::Relaxed);
    result
}

/// Runs `f` with the GIL released, on a thread that may run a shard, and
/// parks instead of taking the GIL back if the interpreter started exiting
/// meanwhile (see [`detached`]; this one takes no part in the shards' GIL
/// hand-off).
pub(crate) fn detached_exit_aware<T: Send>(py: Python<'_>, f: impl FnOnce() -> T) -> T {
    let was_present = with_presence(|presence| presence.swap(false, Ordering::SeqCst));
    let f = OnThisThread(f);
    let result = py.detach(move || {
        let result = f.into_inner()();
        if !may_enter() {
            park_for_good();
        }
        result
    });
    set_present(was_present);
    result
}

/// Whether [`prepare_exit`] has run: no new shard may start.
pub(crate) fn exiting() -> bool {
    EXITING.load(Ordering::SeqCst)
}

/// Called at interpreter exit (before finalization), on the exiting
/// thread: from now on shard threads park rather than enter Python, and
/// this waits, with the GIL released, for those inside Python to leave it
/// (each leaves when the code it runs returns to its loop's next wait), up
/// to `limit`.
///
/// A shard that still runs Python code when the interpreter finalizes is
/// ended by CPython mid-call (with the GIL, by `pthread_exit` at its next
/// take of the GIL, whose forced unwinding through Rust frames aborts the
/// process; free-threaded, it crashes too). So the wait goes on past
/// `limit` as long as a shard inside Python is running (on a CPU), as
/// CPython waits for a non-daemon thread, saying so every `limit`; a shard
/// blocked in a call (`time.sleep`, a socket) is left there. Ctrl-C during
/// the wait ends the process at once, with status 130, without finalizing
/// the interpreter.
pub(crate) fn prepare_exit(py: Python<'_>, limit: Duration) -> PyResult<()> {
    context::with(|c| c.finalizer.set(true));
    EXITING.store(true, Ordering::SeqCst);
    let me = with_presence(Arc::as_ptr);
    let others: Vec<(Arc<AtomicBool>, libc::pid_t)> = PRESENT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter_map(|(flag, tid)| Some((flag.upgrade()?, *tid)))
        .filter(|(flag, _)| !std::ptr::eq(Arc::as_ptr(flag), me))
        .collect();
    let inside = || others.iter().any(|(flag, _)| flag.load(Ordering::SeqCst));
    // Inside Python and on a CPU: running Python code, so it will take the
    // GIL again (one blocked in a call, `time.sleep` say, is not).
    let running = || {
        others
            .iter()
            .any(|(flag, tid)| flag.load(Ordering::SeqCst) && is_running(*tid))
    };
    let started = Instant::now();
    let mut next_notice = Duration::from_secs(1).min(limit);
    loop {
        let mut ran = false;
        py.detach(|| {
            let until = Instant::now() + Duration::from_millis(50);
            while inside() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(2));
                ran = ran || running();
            }
        });
        if let Err(interrupt) = py.check_signals() {
            if !inside() {
                return Err(interrupt);
            }
            exit_now(py, 130);
        }
        let overdue = started.elapsed() >= limit;
        if !inside() || (overdue && !ran) {
            return Ok(());
        }
        if started.elapsed() >= next_notice {
            next_notice = started.elapsed() + limit.max(Duration::from_secs(1));
            if overdue {
                eprintln!(
                    "shardloop: the interpreter is exiting; waiting for shards of a running \
                     runtime that are still running Python code ({:.0?} so far; Ctrl-C exits at \
                     once)",
                    started.elapsed()
                );
            } else {
                eprintln!(
                    "shardloop: the interpreter is exiting; waiting (at most {limit:?}, or as \
                     long as they run Python code) for shards of a running runtime to finish \
                     the Python code they run"
                );
            }
        }
    }
}

/// Whether thread `tid` of this process is on a CPU or ready for one
/// (state `R` in `/proc`).
fn is_running(tid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the command name, which is in parentheses.
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().next().map(|state| state == "R")
        })
        .unwrap_or(false)
}

/// Ends the process now with `status`, after flushing Python's standard
/// streams, without finalizing the interpreter (which a shard inside
/// Python would turn into an abort).
fn exit_now(py: Python<'_>, status: i32) -> ! {
    if let Ok(sys) = py.import("sys") {
        for stream in ["stdout", "stderr"] {
            if let Ok(stream) = sys.getattr(stream) {
                let _ = stream.call_method0("flush");
            }
        }
    }
    eprintln!("shardloop: interrupted while shards were still running Python code: exiting now");
    // SAFETY: `_exit` ends the process without running anything more in
    // it; no state of this process outlives the call.
    unsafe { libc::_exit(status) }
}

fn claim(me: usize) {
    let polite = context::with(|c| c.overprovisioned.get());
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
