//! The per-shard executor for local (`!Send`) tasks.
//!
//! Tasks live in a slab owned by their shard and are only ever polled there.
//! Their wakers are ordinary `Send + Sync` wakers: woken on the owning shard
//! they push the task onto the local ready queue; woken from any other thread
//! they go through the shard's remote-wake list and wake the shard if it
//! sleeps. Either way the task runs, and finishes, on the shard that created it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use crate::error::{Error, Result};

/// A task's slab index (low 32 bits) and generation (high 32 bits), so a stale
/// waker of a finished task never wakes the task that reuses its slot.
pub(crate) type TaskId = u64;

/// The id of the future driven by `block_on`, which is not in the slab.
pub(crate) const MAIN_TASK: TaskId = u64::MAX;

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;

/// Wake-ups posted to a shard from other threads.
#[derive(Debug, Default)]
pub(crate) struct RemoteWakes {
    any: AtomicBool,
    ids: Mutex<Vec<TaskId>>,
}

impl RemoteWakes {
    pub(crate) fn post(&self, id: TaskId) {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).push(id);
        self.any.store(true, Ordering::Release);
    }

    pub(crate) fn is_empty(&self) -> bool {
        !self.any.load(Ordering::Acquire)
    }

    fn take(&self, out: &mut Vec<TaskId>) {
        if self.any.swap(false, Ordering::Acquire) {
            out.append(&mut self.ids.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
}

/// The waker of one task. `wake` defers to the runtime, which knows whether
/// the current thread is the task's shard.
pub(crate) struct TaskWaker<H: WakeTarget> {
    pub(crate) id: TaskId,
    pub(crate) target: Arc<H>,
}

/// How a task waker reaches its shard.
pub(crate) trait WakeTarget: Send + Sync + 'static {
    fn wake_task(self: &Arc<Self>, id: TaskId);
}

impl<H: WakeTarget> Wake for TaskWaker<H> {
    fn wake(self: Arc<Self>) {
        self.target.wake_task(self.id);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.target.wake_task(self.id);
    }
}

struct Slot {
    generation: u32,
    future: Option<LocalFuture>,
    waker: Option<Waker>,
    queued: bool,
}

/// The local task set of one shard.
#[derive(Default)]
pub(crate) struct Executor {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    ready: RefCell<VecDeque<TaskId>>,
}

fn split(id: TaskId) -> (usize, u32) {
    ((id & 0xffff_ffff) as usize, (id >> 32) as u32)
}

impl Executor {
    /// Adds a task and queues it for its first poll. `make_waker` builds the
    /// task's waker from its id.
    pub(crate) fn spawn(&self, future: LocalFuture, make_waker: impl FnOnce(TaskId) -> Waker) {
        let mut slots = self.slots.borrow_mut();
        let index = match self.free.borrow_mut().pop() {
            Some(index) => index as usize,
            None => {
                slots.push(Slot {
                    generation: 0,
                    future: None,
                    waker: None,
                    queued: false,
                });
                slots.len() - 1
            }
        };
        let slot = &mut slots[index];
        let id = (u64::from(slot.generation) << 32) | index as u64;
        slot.future = Some(future);
        slot.waker = Some(make_waker(id));
        slot.queued = true;
        self.ready.borrow_mut().push_back(id);
    }

    /// Queues the task `id` if it is alive and not queued yet.
    pub(crate) fn schedule(&self, id: TaskId) {
        let (index, generation) = split(id);
        let mut slots = self.slots.borrow_mut();
        if let Some(slot) = slots.get_mut(index) {
            if slot.generation == generation && slot.future.is_some() && !slot.queued {
                slot.queued = true;
                self.ready.borrow_mut().push_back(id);
            }
        }
    }

    /// Moves remote wake-ups into the ready queue; returns whether any came.
    pub(crate) fn take_remote(
        &self,
        remote: &RemoteWakes,
        scratch: &mut Vec<TaskId>,
        main: &Cell<bool>,
    ) -> bool {
        remote.take(scratch);
        let any = !scratch.is_empty();
        for id in scratch.drain(..) {
            if id == MAIN_TASK {
                main.set(true);
            } else {
                self.schedule(id);
            }
        }
        any
    }

    /// Polls every task that is ready now (tasks woken while this runs wait for
    /// the next turn). Returns how many were polled.
    pub(crate) fn run_ready(&self) -> usize {
        let count = self.ready.borrow().len();
        for _ in 0..count {
            let Some(id) = self.ready.borrow_mut().pop_front() else {
                break;
            };
            let (index, _) = split(id);
            let (mut future, waker) = {
                let mut slots = self.slots.borrow_mut();
                let slot = &mut slots[index];
                slot.queued = false;
                match slot.future.take() {
                    Some(future) => (future, slot.waker.clone().expect("a live task has a waker")),
                    None => continue,
                }
            };
            // The slab is not borrowed while the task runs: it may spawn or
            // wake other tasks.
            let done = future
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_ready();
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[index];
            if done {
                slot.waker = None;
                slot.queued = false;
                slot.generation = slot.generation.wrapping_add(1);
                self.free.borrow_mut().push(index as u32);
                drop(slots);
                drop(future);
            } else {
                slot.future = Some(future);
            }
        }
        count
    }

    /// Whether tasks are queued to run.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.borrow().is_empty()
    }

    /// Drops every task (on the owning shard, at shutdown).
    pub(crate) fn clear(&self) {
        let futures: Vec<_> = self
            .slots
            .borrow_mut()
            .iter_mut()
            .filter_map(|slot| slot.future.take())
            .collect();
        self.ready.borrow_mut().clear();
        drop(futures);
    }
}

/// A future that turns a panic while polling the inner future into an error.
pub(crate) struct CatchUnwind<F> {
    inner: Pin<Box<F>>,
    shard: usize,
}

impl<F: Future> CatchUnwind<F> {
    pub(crate) fn new(inner: F, shard: usize) -> Self {
        Self {
            inner: Box::pin(inner),
            shard,
        }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let shard = self.shard;
        match catch_unwind(AssertUnwindSafe(|| self.inner.as_mut().poll(cx))) {
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(Error::from_panic(shard, payload))),
        }
    }
}

struct JoinState<T> {
    result: Option<Result<T>>,
    waker: Option<Waker>,
}

/// Awaits the output of a task started with [`spawn_local`](crate::spawn_local).
/// Dropping the handle detaches the task; it keeps running.
pub struct JoinHandle<T> {
    state: Rc<RefCell<JoinState<T>>>,
}

impl<T> JoinHandle<T> {
    /// Whether the task has finished.
    pub fn is_finished(&self) -> bool {
        self.state.borrow().result.is_some()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.state.borrow_mut();
        match state.result.take() {
            Some(result) => Poll::Ready(result),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Wraps `future` so that its output (or its panic) lands in a join handle.
pub(crate) fn joinable<F>(future: F, shard: usize) -> (LocalFuture, JoinHandle<F::Output>)
where
    F: Future + 'static,
    F::Output: 'static,
{
    let state = Rc::new(RefCell::new(JoinState {
        result: None,
        waker: None,
    }));
    let handle = JoinHandle {
        state: state.clone(),
    };
    let task = async move {
        let result = CatchUnwind::new(future, shard).await;
        let waker = {
            let mut state = state.borrow_mut();
            state.result = Some(result);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    };
    (Box::pin(task), handle)
}
