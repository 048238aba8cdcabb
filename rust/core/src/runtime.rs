//! Shards, their poll loop, and the [`Runtime`] that starts and stops them.
//!
//! Each shard is one thread (shard 0 is the thread that calls
//! [`Runtime::block_on`]) owning a [`Shard`]: its ends of the two queue
//! matrices, its local tasks, timers and epoll instance. One turn of the loop
//! ([`Shard::poll_once`]) takes every incoming request and completion, runs
//! every ready task, fires due timers, polls I/O, and finally pushes the
//! batches it produced. A shard that has found nothing to do for `idle_poll`
//! sleeps in `epoll_wait` after the handshake of [`crate::wake`].

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::call::{Call, Calls, Deferred, Envelope, Message, Submit, Value};
use crate::error::{Error, Result};
use crate::executor::{
    joinable, Executor, JoinHandle, RemoteWakes, TaskId, TaskWaker, WakeTarget, MAIN_TASK,
};
use crate::io::{Reactor, WAKE_TOKEN};
use crate::matrix::{Inbox, Matrix, Outbox};
use crate::stats::{self, QueueCounters, ShardCounters, Stats};
use crate::timer::Timers;
use crate::wake::SleepFlag;
use std::os::fd::RawFd;

/// How often a shard polls epoll without waiting, in turns of its loop (a
/// shard that goes to sleep polls it then too). A syscall costs as much as
/// dozens of turns, so it is not done on every idle turn.
const IO_POLL_INTERVAL: u64 = 16;

/// How often an idle shard reads the clock to decide whether to sleep.
const IDLE_CLOCK_INTERVAL: u32 = 32;

/// Settings of a runtime; see [`Builder`].
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) shards: Option<usize>,
    pub(crate) pin: bool,
    pub(crate) idle_poll: Duration,
    pub(crate) batch: usize,
    pub(crate) ring_capacity: usize,
}

/// Configures and builds a [`Runtime`].
#[derive(Debug, Clone)]
pub struct Builder {
    config: Config,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            config: Config {
                shards: None,
                pin: true,
                idle_poll: Duration::from_micros(200),
                batch: 16,
                ring_capacity: 1024,
            },
        }
    }
}

impl Builder {
    /// The number of shards; by default one per available core. Zero is an
    /// error at [`build`](Self::build).
    pub fn shards(mut self, shards: usize) -> Self {
        self.config.shards = Some(shards);
        self
    }

    /// Whether to pin shard `i` to the `i`-th available core (default `true`;
    /// turned off, with a message, when there are more shards than cores).
    /// Shard 0 is the thread that builds the runtime.
    pub fn pin(mut self, pin: bool) -> Self {
        self.config.pin = pin;
        self
    }

    /// How long an idle shard keeps polling before it sleeps (default 200 us;
    /// zero sleeps at once).
    pub fn idle_poll(mut self, idle_poll: Duration) -> Self {
        self.config.idle_poll = idle_poll;
        self
    }

    /// Items per batch: a sender pushes its FIFO for a peer onto the ring when
    /// it holds this many, or at the end of its poll (default 16).
    pub fn batch(mut self, batch: usize) -> Self {
        self.config.batch = batch.max(1);
        self
    }

    /// Capacity of each ring, rounded up to a power of two (default 1024).
    pub fn ring_capacity(mut self, capacity: usize) -> Self {
        self.config.ring_capacity = capacity;
        self
    }

    /// Starts shards 1..N on their own threads and makes the calling thread
    /// shard 0.
    pub fn build(self) -> Result<Runtime> {
        Runtime::start(self.config, None)
    }

    /// Like [`build`](Self::build), but each of shards 1..N runs `main`
    /// instead of the built-in loop, and `main` drives its shard through the
    /// [`Driver`] it is given (this is how another event loop, such as
    /// Python's, runs on a shard). Shard 0's driver comes from
    /// [`Runtime::enter`]. `main` should return once [`Driver::may_stop`]
    /// says so.
    pub fn build_driven<M>(self, main: M) -> Result<Runtime>
    where
        M: Fn(Driver) + Send + Sync + 'static,
    {
        Runtime::start(self.config, Some(Arc::new(main)))
    }
}

/// What every thread may touch of one shard.
pub(crate) struct ShardHandle {
    flag: SleepFlag,
    waker: mio::Waker,
    remote: RemoteWakes,
}

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

/// Runtime-wide state, shared by all shards.
pub(crate) struct Shared {
    config: Config,
    count: usize,
    handles: Vec<Arc<ShardHandle>>,
    closing: AtomicBool,
    drained: Vec<CachePadded<AtomicBool>>,
    queues: Vec<Arc<QueueCounters>>,
    counters: Vec<CachePadded<ShardCounters>>,
}

impl Shared {
    fn stats(&self) -> Stats {
        stats::snapshot_from(&self.queues, &self.counters)
    }
}

/// One shard's private state; lives on its thread only.
pub(crate) struct Shard {
    pub(crate) id: usize,
    shared: Arc<Shared>,
    handle: Arc<ShardHandle>,
    requests_out: Vec<Option<RefCell<Outbox<Envelope>>>>,
    responses_out: Vec<Option<RefCell<Outbox<Envelope>>>>,
    requests_in: RefCell<Vec<Inbox<Envelope>>>,
    responses_in: RefCell<Vec<Inbox<Envelope>>>,
    /// Per peer: the last sleep of that peer this shard notified.
    notified: RefCell<Vec<usize>>,
    messages: RefCell<Vec<Envelope>>,
    remote_ids: RefCell<Vec<TaskId>>,
    timer_wakers: RefCell<Vec<Waker>>,
    pub(crate) exec: Executor,
    pub(crate) timers: RefCell<Timers>,
    pub(crate) reactor: Reactor,
    pub(crate) calls: RefCell<Calls>,
    /// Messages sent from this shard that have not come back yet.
    in_flight: Cell<usize>,
    main_woken: Cell<bool>,
    /// Set by [`wake_driver`]: the external driver has work to look at.
    attention: Cell<bool>,
    closing_seen: Cell<bool>,
    polls: Cell<u64>,
}

/// The ends of the matrices and the epoll instance of one shard, built on the
/// runtime's thread and moved to the shard's.
struct Parts {
    id: usize,
    poll: mio::Poll,
    requests_out: Vec<Option<crate::ring::Producer<Envelope>>>,
    responses_out: Vec<Option<crate::ring::Producer<Envelope>>>,
    requests_in: Vec<Option<crate::ring::Consumer<Envelope>>>,
    responses_in: Vec<Option<crate::ring::Consumer<Envelope>>>,
}

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
struct Enter {
    previous: Option<Rc<Shard>>,
}

impl Enter {
    fn new(shard: Rc<Shard>) -> Self {
        Self::try_new(shard).expect("the thread's shard slot is gone: the thread is exiting")
    }

    /// Like [`new`](Self::new), or `None` while the thread's locals are
    /// being destroyed (a runtime dropped as its owning thread exits).
    fn try_new(shard: Rc<Shard>) -> Option<Self> {
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

impl Shard {
    fn new(parts: Parts, shared: Arc<Shared>) -> Self {
        let id = parts.id;
        let count = shared.count;
        let outbox =
            |peer: usize, ring: Option<crate::ring::Producer<Envelope>>, requests: bool| {
                let counters = if requests {
                    shared.queues[id * count + peer].clone()
                } else {
                    shared.queues[peer * count + id].clone()
                };
                ring.map(|ring| {
                    RefCell::new(Outbox::new(ring, shared.config.batch, counters, requests))
                })
            };
        let requests_out = parts
            .requests_out
            .into_iter()
            .enumerate()
            .map(|(peer, ring)| outbox(peer, ring, true))
            .collect();
        let responses_out = parts
            .responses_out
            .into_iter()
            .enumerate()
            .map(|(peer, ring)| outbox(peer, ring, false))
            .collect();
        let inboxes = |rings: Vec<Option<crate::ring::Consumer<Envelope>>>, requests: bool| {
            rings
                .into_iter()
                .enumerate()
                .filter_map(|(peer, ring)| {
                    let counters = if requests {
                        shared.queues[peer * count + id].clone()
                    } else {
                        shared.queues[id * count + peer].clone()
                    };
                    ring.map(|ring| Inbox::new(ring, counters, requests))
                })
                .collect()
        };
        Self {
            id,
            handle: shared.handles[id].clone(),
            requests_out,
            responses_out,
            requests_in: RefCell::new(inboxes(parts.requests_in, true)),
            responses_in: RefCell::new(inboxes(parts.responses_in, false)),
            notified: RefCell::new(vec![0; count]),
            messages: RefCell::default(),
            remote_ids: RefCell::default(),
            timer_wakers: RefCell::default(),
            exec: Executor::default(),
            timers: RefCell::default(),
            reactor: Reactor::new(parts.poll),
            calls: RefCell::default(),
            in_flight: Cell::new(0),
            main_woken: Cell::new(false),
            attention: Cell::new(false),
            closing_seen: Cell::new(false),
            polls: Cell::new(0),
            shared,
        }
    }

    fn counters(&self) -> &ShardCounters {
        &self.shared.counters[self.id]
    }

    /// Spawns a local task.
    pub(crate) fn spawn(&self, future: Pin<Box<dyn Future<Output = ()>>>) {
        let handle = self.handle.clone();
        self.exec.spawn(future, |id| {
            Waker::from(Arc::new(TaskWaker { id, target: handle }))
        });
    }

    /// Whether `target` may receive a call now.
    fn check_target(&self, target: usize) -> Result<()> {
        if target >= self.shared.count {
            return Err(Error::NoSuchShard {
                shard: target,
                count: self.shared.count,
            });
        }
        if self.is_closing() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    fn send_request(&self, to: usize, message: Envelope) {
        self.in_flight.set(self.in_flight.get() + 1);
        let outbox = self.requests_out[to].as_ref().expect("no ring to self");
        if outbox.borrow_mut().send(message) {
            self.flush_to(to);
        }
    }

    /// Sends a finished call back to its origin.
    pub(crate) fn respond(&self, origin: usize, message: Envelope) {
        if origin == self.id {
            message.complete();
            return;
        }
        let outbox = self.responses_out[origin]
            .as_ref()
            .expect("no ring to self");
        if outbox.borrow_mut().send(message) {
            self.flush_to(origin);
        }
    }

    /// Pushes what waits for `peer` and wakes it if it sleeps.
    fn flush_to(&self, peer: usize) {
        let mut moved = 0;
        for outboxes in [&self.requests_out, &self.responses_out] {
            if let Some(outbox) = &outboxes[peer] {
                let mut outbox = outbox.borrow_mut();
                if outbox.has_pending() {
                    moved += outbox.flush();
                }
            }
        }
        if moved > 0 {
            let handle = &self.shared.handles[peer];
            if handle
                .flag
                .must_notify(&mut self.notified.borrow_mut()[peer])
            {
                let _ = handle.waker.wake();
                self.counters().wakeups.add(1);
            }
        }
    }

    fn flush_all(&self) {
        for peer in (0..self.shared.count).filter(|&peer| peer != self.id) {
            self.flush_to(peer);
        }
    }

    fn has_pending_outboxes(&self) -> bool {
        self.requests_out
            .iter()
            .chain(&self.responses_out)
            .flatten()
            .any(|outbox| outbox.borrow().has_pending())
    }

    /// Runs every incoming request and completes every returned call.
    fn take_messages(&self) -> bool {
        let mut batch = std::mem::take(&mut *self.messages.borrow_mut());
        for inbox in self.requests_in.borrow_mut().iter_mut() {
            inbox.drain_into(&mut batch);
        }
        let mut work = !batch.is_empty();
        for message in batch.drain(..) {
            message.run();
        }
        if work {
            // Answers go out now, not after the rest of this turn.
            self.flush_all();
        }
        for inbox in self.responses_in.borrow_mut().iter_mut() {
            inbox.drain_into(&mut batch);
        }
        if !batch.is_empty() {
            work = true;
            self.in_flight.set(self.in_flight.get() - batch.len());
        }
        for message in batch.drain(..) {
            message.complete();
        }
        *self.messages.borrow_mut() = batch;
        work
    }

    fn fire_timers(&self) -> bool {
        let mut wakers = std::mem::take(&mut *self.timer_wakers.borrow_mut());
        self.timers
            .borrow_mut()
            .expired(Instant::now(), &mut wakers);
        let fired = !wakers.is_empty();
        for waker in wakers.drain(..) {
            waker.wake();
        }
        *self.timer_wakers.borrow_mut() = wakers;
        fired
    }

    /// One turn of the loop. Returns whether it found anything to do.
    pub(crate) fn poll_once(&self) -> bool {
        let polls = self.polls.get() + 1;
        self.polls.set(polls);
        self.counters().polls.add(1);

        let mut work = self.take_messages();
        if !self.handle.remote.is_empty() {
            work |= self.exec.take_remote(
                &self.handle.remote,
                &mut self.remote_ids.borrow_mut(),
                &self.main_woken,
            );
        }
        if !self.timers.borrow().is_empty() {
            work |= self.fire_timers();
        }
        let ran = self.exec.run_ready();
        if ran > 0 {
            self.counters().tasks_run.add(ran as u64);
            work = true;
        }
        if self.reactor.has_sources() && polls % IO_POLL_INTERVAL == 0 {
            work |= self.reactor.poll(Some(Duration::ZERO));
        }
        self.flush_all();
        work
    }

    /// Whether anything arrived since the last turn (the sleeper's re-check).
    fn has_input(&self) -> bool {
        self.main_woken.get()
            || self.attention.get()
            || self.exec.has_ready()
            || !self.handle.remote.is_empty()
            || self
                .requests_in
                .borrow_mut()
                .iter_mut()
                .any(|inbox| !inbox.is_empty())
            || self
                .responses_in
                .borrow_mut()
                .iter_mut()
                .any(|inbox| !inbox.is_empty())
    }

    /// The sleep point: blocks in epoll until notified, a descriptor is ready
    /// or the next timer is due.
    fn sleep(&self, until: Option<Instant>) {
        if self.has_pending_outboxes() {
            // A full ring: its consumer is busy draining it, keep polling.
            return;
        }
        let next_timer = self.timers.borrow().next_deadline();
        let wake_at = match (next_timer, until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timeout = wake_at.map(|at| at.saturating_duration_since(Instant::now()));
        self.handle.flag.sleep(
            || self.has_input(),
            || {
                self.counters().sleeps.add(1);
                self.reactor.poll(timeout);
            },
        );
    }

    /// Runs the loop until `done` says so (it is asked after every turn) or
    /// `until` passes. Returns whether `done` ended it.
    fn run_until(&self, until: Option<Instant>, mut done: impl FnMut(bool) -> bool) -> bool {
        let idle_poll = self.shared.config.idle_poll;
        let mut idle_since: Option<Instant> = None;
        let mut idle_turns = 0u32;
        loop {
            let work = self.poll_once();
            if done(work) {
                return true;
            }
            if work || self.main_woken.get() {
                idle_since = None;
                idle_turns = 0;
                continue;
            }
            // Reading the clock costs as much as a turn of the loop; look at
            // it only every IDLE_CLOCK_INTERVAL idle turns.
            idle_turns += 1;
            if idle_poll.is_zero() || idle_turns % IDLE_CLOCK_INTERVAL == 1 {
                let now = Instant::now();
                if until.is_some_and(|until| now >= until) {
                    return false;
                }
                let since = *idle_since.get_or_insert(now);
                if now.duration_since(since) >= idle_poll {
                    self.sleep(until);
                    idle_since = None;
                    idle_turns = 0;
                    continue;
                }
            }
            std::hint::spin_loop();
        }
    }

    fn is_closing(&self) -> bool {
        if !self.closing_seen.get() && self.shared.closing.load(Ordering::Acquire) {
            self.closing_seen.set(true);
        }
        self.closing_seen.get()
    }

    fn may_stop(&self) -> bool {
        if !self.is_closing() {
            return false;
        }
        let drained = &self.shared.drained[self.id];
        if !drained.load(Ordering::Relaxed) {
            if self.in_flight.get() > 0 || self.has_pending_outboxes() {
                return false;
            }
            drained.store(true, Ordering::SeqCst);
            for (peer, handle) in self.shared.handles.iter().enumerate() {
                if peer != self.id {
                    let _ = handle.waker.wake();
                }
            }
        }
        self.shared.drained.iter().all(|d| d.load(Ordering::SeqCst))
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        let mut future = pin!(future);
        let waker = Waker::from(Arc::new(TaskWaker {
            id: MAIN_TASK,
            target: self.handle.clone(),
        }));
        let mut cx = Context::from_waker(&waker);
        self.main_woken.set(true);
        let mut output = None;
        self.run_until(None, |_| {
            if self.main_woken.replace(false) {
                if let Poll::Ready(value) = future.as_mut().poll(&mut cx) {
                    output = Some(value);
                }
                // Calls the future just made go out now, not next turn.
                self.flush_all();
            }
            output.is_some()
        });
        output.expect("run_until returns once the future is ready")
    }
}

/// A running set of shards. Dropping it shuts them down gracefully.
pub struct Runtime {
    shared: Arc<Shared>,
    shard0: Rc<Shard>,
    threads: Vec<thread::JoinHandle<()>>,
    pinned: bool,
}

/// What a driven runtime runs on shards 1..N.
type ThreadMain = Arc<dyn Fn(Driver) + Send + Sync>;

static PIN_NOTICE: std::sync::Once = std::sync::Once::new();

/// The cores this process may run on, read once: pinning shard 0 narrows the
/// calling thread's own affinity, which must not shrink later runtimes.
fn available_cores() -> &'static [core_affinity::CoreId] {
    static CORES: std::sync::OnceLock<Vec<core_affinity::CoreId>> = std::sync::OnceLock::new();
    CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default())
}

impl Runtime {
    /// A builder with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn start(config: Config, main: Option<ThreadMain>) -> Result<Self> {
        let cores = available_cores();
        let count = config.shards.unwrap_or(cores.len().max(1));
        if count == 0 {
            return Err(Error::Build("a runtime needs at least one shard".into()));
        }
        let pinned = config.pin && count <= cores.len();
        if config.pin && !pinned {
            PIN_NOTICE.call_once(|| {
                eprintln!(
                    "shardloop: {count} shards on {} available cores: pinning is off",
                    cores.len()
                );
            });
        }

        let mut polls = Vec::with_capacity(count);
        let mut handles = Vec::with_capacity(count);
        for _ in 0..count {
            let poll = mio::Poll::new().map_err(|e| Error::Build(format!("epoll: {e}")))?;
            let waker = mio::Waker::new(poll.registry(), WAKE_TOKEN)
                .map_err(|e| Error::Build(format!("eventfd: {e}")))?;
            handles.push(Arc::new(ShardHandle {
                flag: SleepFlag::new(),
                waker,
                remote: RemoteWakes::default(),
            }));
            polls.push(poll);
        }
        let shared = Arc::new(Shared {
            count,
            handles,
            closing: AtomicBool::new(false),
            drained: (0..count)
                .map(|_| CachePadded::new(AtomicBool::new(false)))
                .collect(),
            queues: (0..count * count).map(|_| Arc::default()).collect(),
            counters: (0..count).map(|_| CachePadded::default()).collect(),
            config: config.clone(),
        });

        let requests = Matrix::<Envelope>::new(count, config.ring_capacity);
        let responses = Matrix::<Envelope>::new(count, config.ring_capacity);
        let mut parts: Vec<Parts> = polls
            .into_iter()
            .zip(requests.outgoing.into_iter().zip(requests.incoming))
            .zip(responses.outgoing.into_iter().zip(responses.incoming))
            .enumerate()
            .map(
                |(id, ((poll, (requests_out, requests_in)), (responses_out, responses_in)))| {
                    Parts {
                        id,
                        poll,
                        requests_out,
                        responses_out,
                        requests_in,
                        responses_in,
                    }
                },
            )
            .collect();

        let mut threads = Vec::with_capacity(count - 1);
        for parts in parts.drain(1..) {
            let shared = shared.clone();
            let main = main.clone();
            let core = pinned.then(|| cores[parts.id]);
            let thread = thread::Builder::new()
                .name(format!("shard-{}", parts.id))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    let shard = Rc::new(Shard::new(parts, shared));
                    match &main {
                        Some(main) => {
                            main(Driver {
                                shard: shard.clone(),
                            });
                            // Whatever the driving loop left: finish it here.
                            let _enter = Enter::new(shard.clone());
                            shard.run_until(None, |_| shard.may_stop());
                            shard.exec.clear();
                        }
                        None => {
                            let _enter = Enter::new(shard.clone());
                            shard.run_until(None, |_| shard.may_stop());
                            shard.exec.clear();
                        }
                    }
                })
                .map_err(|e| Error::Build(format!("spawning a shard thread: {e}")))?;
            threads.push(thread);
        }
        if pinned {
            core_affinity::set_for_current(cores[0]);
        }
        let shard0 = Rc::new(Shard::new(parts.pop().expect("shard 0"), shared.clone()));
        Ok(Self {
            shared,
            shard0,
            threads,
            pinned,
        })
    }

    /// Runs `future` to completion on shard 0 (the calling thread), serving
    /// shard 0's queues meanwhile.
    ///
    /// # Panics
    /// If the calling thread is already running a shard.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let _enter = Enter::new(self.shard0.clone());
        self.shard0.block_on(future)
    }

    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        self.shared.count
    }

    /// Whether the shards are pinned to cores.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// A snapshot of the queue and shard counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The driver of shard 0, for a runtime whose shard 0 (the calling
    /// thread) is driven by another loop. Activate it while that loop runs.
    pub fn driver(&self) -> Driver {
        Driver {
            shard: self.shard0.clone(),
        }
    }

    /// Stops accepting calls (they fail with [`Error::Closed`]) and tells
    /// every shard to finish what was submitted and stop. Driven shards see
    /// it through [`Driver::may_stop`]; [`shutdown`](Self::shutdown) then
    /// joins them.
    pub fn begin_shutdown(&self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        for handle in &self.shared.handles {
            let _ = handle.waker.wake();
        }
    }

    /// Stops accepting calls, finishes every call already submitted, and
    /// joins the shard threads. Local tasks still running are dropped, each
    /// on its own shard.
    pub fn shutdown(mut self) {
        self.stop(None);
    }

    /// Shuts down; with a `limit`, gives up waiting for the shards after it,
    /// says so on stderr and leaves their threads running.
    fn stop(&mut self, limit: Option<Duration>) {
        if self.threads.is_empty() && self.shared.closing.load(Ordering::Acquire) {
            return;
        }
        self.begin_shutdown();
        if !self.shard0.is_closing() || !self.shard0.may_stop() {
            // While the owning thread exits, shard 0 can no longer run.
            let drained = Enter::try_new(self.shard0.clone()).is_some_and(|_enter| {
                let until = limit.map(|limit| Instant::now() + limit);
                let drained = self.shard0.run_until(until, |_| self.shard0.may_stop());
                self.shard0.exec.clear();
                drained
            });
            if !drained {
                let waiting: Vec<usize> = (0..self.shared.count)
                    .filter(|&i| !self.shared.drained[i].load(Ordering::SeqCst))
                    .collect();
                eprintln!(
                    "shardloop: the runtime was dropped without a shutdown and shards {waiting:?} \
                     still had calls in flight after {:?}; their threads are left running",
                    limit.unwrap_or_default()
                );
                self.threads.clear();
                return;
            }
        }
        let mut panicked = None;
        for thread in self.threads.drain(..) {
            if let Err(payload) = thread.join() {
                panicked.get_or_insert(payload);
            }
        }
        if let Some(payload) = panicked {
            if !thread::panicking() {
                std::panic::resume_unwind(payload);
            }
        }
    }
}

/// How long dropping a runtime (rather than shutting it down) waits for the
/// shards: a driven runtime whose driving loops are gone may never drain.
const DROP_LIMIT: Duration = Duration::from_secs(10);

impl Drop for Runtime {
    /// Shuts down like [`Runtime::shutdown`], but waits at most ten seconds.
    fn drop(&mut self) {
        self.stop(Some(DROP_LIMIT));
    }
}

/// Runs `func` on shard `shard` and resolves to its result. The call is sent
/// at once (the returned future only waits for the answer), so make it on a
/// shard, inside the future given to [`Runtime::block_on`] or a task. On the
/// current shard `func` runs at once (inline, like Seastar's `submit_to`).
///
/// Fails, without sending anything, with [`Error::NoSuchShard`] for an index
/// out of range, [`Error::Closed`] once shutdown has begun, and
/// [`Error::NotOnShard`] off a shard. A panic in `func` comes back as
/// [`Error::Panicked`].
pub fn submit_to<F, R>(shard: usize, func: F) -> Submit<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let submitted = with_shard(|current| {
        current.check_target(shard)?;
        if shard == current.id {
            let result =
                catch_unwind(AssertUnwindSafe(func)).map_err(|p| Error::from_panic(shard, p));
            return Ok(Submit::ready(result));
        }
        let slot = current.calls.borrow_mut().open();
        current.send_request(
            shard,
            Box::new(Call::<F, R, Value>::new(current.id, slot, func)),
        );
        Ok(Submit::remote::<F, Value>(current.clone(), slot))
    });
    submitted
        .and_then(|s| s)
        .unwrap_or_else(|e| Submit::ready(Err(e)))
}

/// Like [`submit_to`], for a closure that returns a future: the closure is
/// sent to `shard`, and the future it returns runs there as a local task (so
/// it need not be `Send`) until it completes.
pub fn submit_to_async<F, Fut>(shard: usize, func: F) -> Submit<Fut::Output>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future + 'static,
    Fut::Output: Send + 'static,
{
    let submitted = with_shard(|current| {
        current.check_target(shard)?;
        if shard == current.id {
            let id = current.id;
            return Ok(Submit::local(Box::pin(async move {
                let future =
                    catch_unwind(AssertUnwindSafe(func)).map_err(|p| Error::from_panic(id, p))?;
                crate::executor::CatchUnwind::new(future, id).await
            })));
        }
        let slot = current.calls.borrow_mut().open();
        let call = Call::<F, Fut::Output, Deferred>::new(current.id, slot, func);
        current.send_request(shard, Box::new(call));
        Ok(Submit::remote::<F, Deferred>(current.clone(), slot))
    });
    submitted
        .and_then(|s| s)
        .unwrap_or_else(|e| Submit::ready(Err(e)))
}

/// Runs `func` on every shard and returns the results in shard order.
pub async fn invoke_on_all<F, R>(func: F) -> Result<Vec<R>>
where
    F: FnOnce() -> R + Clone + Send + 'static,
    R: Send + 'static,
{
    let count = shard_count().ok_or(Error::NotOnShard)?;
    let calls: Vec<Submit<R>> = (0..count)
        .map(|shard| submit_to(shard, func.clone()))
        .collect();
    let mut results = Vec::with_capacity(count);
    for call in calls {
        results.push(call.await?);
    }
    Ok(results)
}

/// The index of the current shard, or `None` off a shard.
pub fn shard_id() -> Option<usize> {
    with_shard(|shard| shard.id).ok()
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

/// Lets another event loop drive a shard: while that loop runs it keeps the
/// driver [activated](Self::activate), and calls [`poll`](Self::poll) or
/// [`wait`](Self::wait) where it would otherwise wait for I/O, handling its
/// own work when they return. `!Send`: it never leaves the shard's thread.
pub struct Driver {
    shard: Rc<Shard>,
}

/// While alive, the driver's shard is the thread's current shard (see
/// [`Driver::activate`]); dropping it restores the previous one.
pub struct Activation {
    _current: Enter,
}

impl Driver {
    /// Makes this driver's shard the thread's current shard (what
    /// [`submit_to`], [`send`] and the other free functions act on) until the
    /// returned guard is dropped. A thread may own drivers of several
    /// runtimes; one of them is active at a time.
    ///
    /// # Panics
    /// If this shard is already active on this thread.
    pub fn activate(&self) -> Activation {
        Activation {
            _current: Enter::new(self.shard.clone()),
        }
    }

    /// This shard's index.
    pub fn shard_id(&self) -> usize {
        self.shard.id
    }

    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        self.shard.shared.count
    }

    /// One turn of the shard's loop, without waiting. Returns whether it found
    /// anything to do.
    pub fn poll(&self) -> bool {
        self.shard.poll_once()
    }

    /// Turns the shard's loop (spinning for `idle_poll`, then sleeping) until
    /// [`wake_driver`] was called by a message or task of this shard, a
    /// watched descriptor became readable, shutdown lets the shard stop, or
    /// `timeout` passes (`None`: no limit). Returns `false` only on timeout.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let shard = &self.shard;
        let until = timeout.map(|timeout| Instant::now() + timeout);
        shard.run_until(until, |_| {
            shard.attention.replace(false)
                || shard.reactor.watched()
                || (shard.is_closing() && shard.may_stop())
        })
    }

    /// Whether a watched descriptor signalled readiness since the last call
    /// (edge-triggered: it reports new readiness, not lasting readiness).
    pub fn take_fd_ready(&self) -> bool {
        self.shard.reactor.take_watched()
    }

    /// Makes [`wait`](Self::wait) return when `fd` becomes readable (for
    /// example the epoll descriptor of the driving loop's own selector).
    pub fn watch_fd(&self, fd: RawFd) -> std::io::Result<()> {
        self.shard.reactor.watch(fd)
    }

    /// Whether shutdown has begun.
    pub fn is_closing(&self) -> bool {
        self.shard.is_closing()
    }

    /// Whether shutdown has begun and every shard has finished its calls, so
    /// the driving loop may stop.
    pub fn may_stop(&self) -> bool {
        self.shard.may_stop()
    }

    /// A snapshot of the runtime's counters.
    pub fn stats(&self) -> Stats {
        self.shard.shared.stats()
    }
}

/// Sends `message` to shard `target`, where its [`Message::run`] runs; it
/// comes back to [`Message::complete`] here. Fails, sending nothing, with
/// [`Error::NoSuchShard`], [`Error::Closed`] or [`Error::NotOnShard`]. A
/// message to the current shard runs at once.
pub fn send(target: usize, message: Box<dyn Message>) -> Result<()> {
    with_shard(|shard| {
        shard.check_target(target)?;
        if target == shard.id {
            message.run();
        } else {
            shard.send_request(target, message);
        }
        Ok(())
    })?
}

/// Hands a message that ran here back to its `origin` shard (see
/// [`Message::run`]).
///
/// # Panics
/// Off a shard.
pub fn respond(origin: usize, message: Box<dyn Message>) {
    with_shard(|shard| shard.respond(origin, message)).expect("respond must be called on a shard");
}

/// Makes the current shard's [`Driver::wait`] return after this turn: for
/// messages that leave work for the driving loop. Does nothing off a shard.
pub fn wake_driver() {
    let _ = with_shard(|shard| shard.attention.set(true));
}

/// Whether `target` is a shard that can receive a call now.
pub fn check_target(target: usize) -> Result<()> {
    with_shard(|shard| shard.check_target(target))?
}

/// Counts `n` units of work run by the driving loop in the current shard's
/// `tasks_run` counter. Does nothing off a shard.
pub fn count_tasks(n: u64) {
    let _ = with_shard(|shard| shard.counters().tasks_run.add(n));
}
