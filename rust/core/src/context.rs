//! The current shard of a thread, and what acts on it: the one
//! thread-local of the crate. A shard's thread (or a thread driving a shard
//! through [`crate::embed::Driver`]) makes its shard current while its loop
//! runs; everything that acts on "this shard" (calls, sleeps, I/O, local
//! tasks, counters) reaches it from here.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::executor::{joinable, JoinHandle, TaskId, WakeTarget, MAIN_TASK};
use crate::shard::{Shard, ShardHandle};
use crate::stats::Stats;

thread_local! {
    static CURRENT: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// Runs `f` with the shard of the calling thread.
pub(crate) fn with_shard<R>(f: impl FnOnce(&Rc<Shard>) -> R) -> Result<R> {
    CURRENT.with(|current| current.borrow().as_ref().map(f).ok_or(Error::NotOnShard))
}

/// Makes `shard` the current thread's shard until dropped, then restores
/// the one that was current before (a thread may own several runtimes, one
/// running at a time).
pub(crate) struct Enter {
    previous: Option<Rc<Shard>>,
}

impl Enter {
    pub(crate) fn new(shard: Rc<Shard>) -> Self {
        Self::try_new(shard).expect("the thread's shard slot is gone: the thread is exiting")
    }

    /// Like [`new`](Self::new), or `None` while the thread's locals are
    /// being destroyed (a runtime dropped as its owning thread exits).
    pub(crate) fn try_new(shard: Rc<Shard>) -> Option<Self> {
        let previous = CURRENT.try_with(|current| {
            let mut current = current.borrow_mut();
            assert!(
                !current.as_ref().is_some_and(|c| Rc::ptr_eq(c, &shard)),
                "this thread is already running this shard; block_on cannot be nested"
            );
            current.replace(shard)
        });
        previous.ok().map(|previous| Enter { previous })
    }
}

impl Drop for Enter {
    fn drop(&mut self) {
        let previous = self.previous.take();
        let shard =
            CURRENT.try_with(|current| std::mem::replace(&mut *current.borrow_mut(), previous));
        drop(shard);
    }
}

/// A task waker reaches its shard directly when woken on the shard's own
/// thread, and through the shard's remote-wake list (and its eventfd, if it
/// sleeps) from anywhere else.
impl WakeTarget for ShardHandle {
    fn wake_task(self: &Arc<Self>, id: TaskId) {
        let woke_locally = with_shard(|shard| {
            if !Arc::ptr_eq(&shard.handle, self) {
                return false;
            }
            if id == MAIN_TASK {
                shard.main_woken.set(true);
            } else {
                shard.exec.schedule(id);
            }
            true
        });
        if woke_locally != Ok(true) {
            self.remote.post(id);
            if self.flag.must_notify(&mut 0) {
                let _ = self.waker.wake();
            }
        }
    }
}

/// The index of the current shard, or `None` off a shard.
pub fn shard_id() -> Option<usize> {
    with_shard(|shard| shard.id).ok()
}

/// A number that tells the runtime of the current shard from every other
/// runtime of the process (runtimes are numbered as they are built, never
/// reusing a number), or `None` off a shard. State made on one runtime can
/// check it to refuse use on a later one.
pub fn runtime_id() -> Option<u64> {
    with_shard(|shard| shard.shared.serial).ok()
}

/// The number of shards of the current runtime, or `None` off a shard.
pub fn shard_count() -> Option<usize> {
    with_shard(|shard| shard.shared.count).ok()
}

/// A snapshot of the current runtime's counters, or `None` off a shard.
pub fn stats() -> Option<Stats> {
    with_shard(|shard| shard.shared.stats()).ok()
}

/// Starts `future` as a task of the current shard; it runs, and finishes, on
/// this shard.
///
/// # Panics
/// Off a shard.
pub fn spawn_local<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    with_shard(|shard| {
        let (task, handle) = joinable(future, shard.id);
        shard.spawn(task);
        handle
    })
    .expect("spawn_local must be called on a shard")
}
