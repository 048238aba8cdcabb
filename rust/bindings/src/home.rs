//! [`Home`]: an `Rc` held by a Python object that any thread may drop, but
//! only the thread of the shard that made it may use.
//!
//! Python objects end up on other threads: a traceback kept by a log
//! handler, a value returned through `submit_to`. A `!Send` state behind
//! such an object must still only be touched on its shard. `Home` checks the
//! thread on every use, and when it is dropped on another thread it sends the
//! `Rc`, untouched, back to its shard as a message, where it is released.

use std::mem::ManuallyDrop;
use std::rc::Rc;

use pyo3::exceptions::PyRuntimeError;
use pyo3::PyResult;

/// Tells the threads apart without a thread-local, so that it also works
/// while a thread's locals are being destroyed.
fn this_thread() -> usize {
    // SAFETY: `pthread_self` has no preconditions and cannot fail.
    unsafe { libc::pthread_self() as usize }
}

/// An `Rc<T>` usable only on the thread of the shard that made it; when it
/// is dropped (on any thread), `release` runs with the `Rc` on that thread.
pub(crate) struct Home<T: 'static> {
    value: ManuallyDrop<Rc<T>>,
    thread: usize,
    /// The runtime it was made on (`shardloop_core::runtime_id`): a later
    /// runtime on the same thread may not use it.
    runtime: Option<u64>,
    shard: usize,
    release: fn(Rc<T>),
    /// Names what it holds in the error of a use on the wrong thread.
    what: &'static str,
}

// SAFETY: the `Rc` (and the `!Send` state behind it) is only reached through
// `Home::local` and `Home::here` (and `Home::get`, which calls `local`), which
// check that the caller is the owning thread, and
// through `Drop`, which on another thread moves the `Rc` untouched to the
// owning shard to be released there. Its count and contents are therefore
// only used by that one thread, as `Rc` requires.
unsafe impl<T> Send for Home<T> {}
// SAFETY: as for `Send`: shared access goes through the same thread check.
unsafe impl<T> Sync for Home<T> {}

impl<T> Home<T> {
    /// Holds `value`, which belongs to shard `shard`, the current thread's.
    /// Made while no shard of a runtime is active here (a shard's driver,
    /// a runtime), it can never be carried home: dropped on another thread,
    /// it is left there untouched.
    pub(crate) fn new(value: Rc<T>, shard: usize, release: fn(Rc<T>), what: &'static str) -> Self {
        Self {
            value: ManuallyDrop::new(value),
            thread: this_thread(),
            runtime: shardloop_core::runtime_id(),
            shard,
            release,
            what,
        }
    }

    /// The value, on its own shard while the runtime that made it runs;
    /// `RuntimeError` elsewhere.
    pub(crate) fn get(&self) -> PyResult<&Rc<T>> {
        let value = self.local()?;
        if shardloop_core::runtime_id() != self.runtime {
            return Err(PyRuntimeError::new_err(format!(
                "{} belongs to a shardloop runtime that is no longer running",
                self.what
            )));
        }
        Ok(value)
    }

    /// The value, on its own thread, whether or not its runtime still runs
    /// (to close it, or to describe it).
    pub(crate) fn local(&self) -> PyResult<&Rc<T>> {
        if this_thread() == self.thread {
            Ok(&self.value)
        } else {
            Err(PyRuntimeError::new_err(format!(
                "{} is used only on its own shard (shard {})",
                self.what, self.shard
            )))
        }
    }

    /// The value, if this is its thread (`local` without the error).
    pub(crate) fn here(&self) -> Option<&Rc<T>> {
        (this_thread() == self.thread).then_some(&*self.value)
    }

    /// The shard it belongs to.
    pub(crate) fn shard(&self) -> usize {
        self.shard
    }
}

impl<T> Drop for Home<T> {
    fn drop(&mut self) {
        // SAFETY: `value` is taken once, here, and not used again.
        let value = unsafe { ManuallyDrop::take(&mut self.value) };
        if this_thread() == self.thread {
            return (self.release)(value);
        }
        let going = Release {
            value: Some(value),
            release: self.release,
            thread: self.thread,
            origin: shardloop_core::shard_id().unwrap_or(usize::MAX),
        };
        // Only the runtime that made it can carry it home (shard `shard` of
        // another runtime is another thread). Off every shard, on another
        // runtime, or once the runtime is closing, the value is left behind
        // (see `Release`'s `Drop`).
        if shardloop_core::runtime_id().is_some() && shardloop_core::runtime_id() == self.runtime {
            let _ = shardloop_core::embed::send(self.shard, Box::new(going));
        }
    }
}

/// Carries an `Rc` let go on another thread back to its shard.
struct Release<T: 'static> {
    value: Option<Rc<T>>,
    release: fn(Rc<T>),
    thread: usize,
    origin: usize,
}

// SAFETY: `Release` moves the `Rc` from the thread that dropped its `Home` to
// the owning shard without touching it (see `Home`); only `run`, on the
// owning shard, uses it, and `complete`, back on the other, finds `None`.
unsafe impl<T> Send for Release<T> {}

impl<T> Drop for Release<T> {
    fn drop(&mut self) {
        if let Some(value) = self.value.take() {
            if this_thread() == self.thread {
                drop(value);
            } else {
                // It could not be sent home: leaving it is the one sound
                // choice (its count belongs to the owning thread).
                std::mem::forget(value);
            }
        }
    }
}

impl<T> shardloop_core::embed::Message for Release<T> {
    fn run(mut self: Box<Self>) {
        if this_thread() == self.thread {
            if let Some(value) = self.value.take() {
                (self.release)(value);
            }
        }
        // Elsewhere (which the runtime check in `Drop` rules out) the value
        // stays in `self` and is left behind by its `Drop`.
        let origin = self.origin;
        shardloop_core::embed::respond(origin, self);
    }

    fn complete(self: Box<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Where each release ran: (shard of the thread, value).
    static RELEASED: Mutex<Vec<(Option<usize>, u32)>> = Mutex::new(Vec::new());
    static LIVE: AtomicUsize = AtomicUsize::new(0);

    struct Tracked(u32);

    impl Drop for Tracked {
        fn drop(&mut self) {
            LIVE.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn record(value: Rc<Tracked>) {
        RELEASED
            .lock()
            .unwrap()
            .push((shardloop_core::shard_id(), value.0));
    }

    fn made_on_shard_1(value: u32) -> Home<Tracked> {
        LIVE.fetch_add(1, Ordering::SeqCst);
        Home::new(Rc::new(Tracked(value)), 1, record, "a test value")
    }

    /// Also: one dropped where no shard can take it back is left alone.
    #[test]
    fn a_home_dropped_on_another_shard_is_released_on_its_own() {
        let rt = shardloop_core::Runtime::builder()
            .shards(2)
            .pin(false)
            .build()
            .unwrap();
        let stray = rt.block_on(async {
            let home = shardloop_core::submit_to(1, || made_on_shard_1(7))
                .await
                .unwrap();
            assert!(home.get().is_err(), "shard 0 may not use shard 1's value");
            drop(home); // sent home: released on shard 1
                        // A round trip to shard 1 after the release message: it ran.
            shardloop_core::submit_to(1, || ()).await.unwrap();
            let here = shardloop_core::submit_to(1, || made_on_shard_1(8))
                .await
                .unwrap();
            shardloop_core::submit_to(1, move || {
                assert_eq!(here.get().map(|v| v.0).ok(), Some(8));
                drop(here); // on its own thread: released at once
            })
            .await
            .unwrap();
            shardloop_core::submit_to(1, || made_on_shard_1(9))
                .await
                .unwrap()
        });
        rt.shutdown();
        drop(stray); // off every shard, the runtime gone: left, not touched
        let released = RELEASED.lock().unwrap().clone();
        assert_eq!(released, [(Some(1), 7), (Some(1), 8)]);
        assert_eq!(
            LIVE.load(Ordering::SeqCst),
            1,
            "7 and 8 were dropped, 9 left"
        );
    }
}
