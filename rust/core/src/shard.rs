//! One shard: its ends of the two queue matrices, its local tasks, timers
//! and epoll instance, and its poll loop. One turn ([`Shard::poll_once`])
//! runs every incoming request and completes every returned call, fires due
//! timers, runs every ready task, polls I/O (every 16th turn, and before a
//! sleep), and pushes the batches it produced. A shard that
//! has found nothing to do for `idle_poll` sleeps in `epoll_wait` after the
//! handshake of [`crate::wake`].

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::calls::Calls;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::executor::{Executor, RemoteWakes, TaskId, TaskWaker, MAIN_TASK};
use crate::matrix::{Direction, Inbox, Outbox};
use crate::message::Envelope;
use crate::reactor::Reactor;
use crate::stats::{self, QueueCounters, ShardCounters, Stats, StatsReader};
use crate::timer::Timers;
use crate::wake::SleepFlag;

/// How often a shard polls epoll without waiting, in turns of its loop (a
/// shard that goes to sleep polls it then too). A syscall costs as much as
/// dozens of turns, so it is not done on every idle turn.
const IO_POLL_INTERVAL: u64 = 16;

/// How often an idle shard reads the clock to decide whether to sleep.
const IDLE_CLOCK_INTERVAL: u32 = 32;

/// What every thread may touch of one shard.
pub(crate) struct ShardHandle {
    pub(crate) flag: SleepFlag,
    pub(crate) waker: mio::Waker,
    pub(crate) remote: RemoteWakes,
}

/// Runtime-wide state, shared by all shards.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) count: usize,
    pub(crate) handles: Vec<Arc<ShardHandle>>,
    /// A process-unique number of this runtime (see [`crate::runtime_id`]).
    pub(crate) serial: u64,
    /// Set once shutdown began: new calls are refused.
    pub(crate) closing: AtomicBool,
    /// Set by [`crate::Runtime::force_stop`]: shards stop without waiting
    /// for the calls still in flight.
    pub(crate) forced: AtomicBool,
    pub(crate) drained: Vec<CachePadded<AtomicBool>>,
    pub(crate) queues: Vec<Arc<QueueCounters>>,
    pub(crate) counters: Arc<[CachePadded<ShardCounters>]>,
}

impl Shared {
    pub(crate) fn stats(&self) -> Stats {
        stats::snapshot_from(&self.queues, &self.counters)
    }

    /// The counters alone, for reading from any thread.
    pub(crate) fn stats_reader(&self) -> StatsReader {
        StatsReader {
            queues: self.queues.clone(),
            shards: self.counters.clone(),
        }
    }

    /// Calls sent and calls completed, summed over every ordered pair.
    fn call_totals(&self) -> (u64, u64) {
        self.queues.iter().fold((0, 0), |(sent, completed), queue| {
            // Completed first: a completion is counted after its send, by
            // the same shard, so reading it first never shows more
            // completions than sends for one pair.
            let done = queue.sender.completed.get_acquire();
            (sent + queue.sender.sent.get_acquire(), completed + done)
        })
    }

    /// Whether no call was in flight between shards at some moment during
    /// this call (the four-counter method: two waves over counters that only
    /// grow; the sends did not move between them and matched the
    /// completions of the first, so at a moment between the waves every
    /// call sent had completed).
    pub(crate) fn is_quiet(&self) -> bool {
        let (sent, completed) = self.call_totals();
        if sent != completed {
            return false;
        }
        self.call_totals().0 == sent
    }

    /// Refuses new calls and wakes every shard so that it sees it.
    pub(crate) fn close(&self, forced: bool) {
        if forced {
            self.forced.store(true, Ordering::SeqCst);
        }
        self.closing.store(true, Ordering::SeqCst);
        for handle in &self.handles {
            let _ = handle.waker.wake();
        }
    }
}

/// One shard's private state; lives on its thread only.
pub(crate) struct Shard {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) handle: Arc<ShardHandle>,
    pub(crate) requests_out: Vec<Option<RefCell<Outbox<Envelope>>>>,
    pub(crate) responses_out: Vec<Option<RefCell<Outbox<Envelope>>>>,
    pub(crate) requests_in: RefCell<Vec<Inbox<Envelope>>>,
    pub(crate) responses_in: RefCell<Vec<Inbox<Envelope>>>,
    /// Per peer: the last sleep of that peer this shard notified.
    pub(crate) notified: RefCell<Vec<usize>>,
    pub(crate) messages: RefCell<Vec<Envelope>>,
    pub(crate) remote_ids: RefCell<Vec<TaskId>>,
    pub(crate) timer_wakers: RefCell<Vec<Waker>>,
    pub(crate) exec: Executor,
    pub(crate) timers: RefCell<Timers>,
    pub(crate) reactor: Reactor,
    pub(crate) calls: RefCell<Calls>,
    /// Messages sent from this shard that have not come back yet.
    pub(crate) in_flight: Cell<usize>,
    pub(crate) main_woken: Cell<bool>,
    /// Set by [`wake_driver`](crate::embed::wake_driver): the external driver has work to look at.
    pub(crate) attention: Cell<bool>,
    pub(crate) closing_seen: Cell<bool>,
}

/// The ends of the matrices and the epoll instance of one shard, built on the
/// runtime's thread and moved to the shard's.
pub(crate) struct Parts {
    pub(crate) id: usize,
    pub(crate) poll: mio::Poll,
    pub(crate) requests_out: Vec<Option<crate::ring::Producer<Envelope>>>,
    pub(crate) responses_out: Vec<Option<crate::ring::Producer<Envelope>>>,
    pub(crate) requests_in: Vec<Option<crate::ring::Consumer<Envelope>>>,
    pub(crate) responses_in: Vec<Option<crate::ring::Consumer<Envelope>>>,
}

impl Shard {
    pub(crate) fn new(parts: Parts, shared: Arc<Shared>) -> Self {
        let id = parts.id;
        let count = shared.count;
        shared.counters[id]
            .tid
            .store(stats::this_tid(), Ordering::Release);
        // The counters of the pair (from, to) live at from * count + to.
        let pair = |peer: usize, outgoing: bool, direction: Direction| {
            let (from, to) = match (direction, outgoing) {
                (Direction::Requests, true) | (Direction::Responses, false) => (id, peer),
                (Direction::Requests, false) | (Direction::Responses, true) => (peer, id),
            };
            shared.queues[from * count + to].clone()
        };
        let outboxes = |rings: Vec<Option<crate::ring::Producer<Envelope>>>, direction| {
            rings
                .into_iter()
                .enumerate()
                .map(|(peer, ring)| {
                    let counters = pair(peer, true, direction);
                    ring.map(|ring| {
                        RefCell::new(Outbox::new(ring, shared.config.batch, counters, direction))
                    })
                })
                .collect()
        };
        let inboxes = |rings: Vec<Option<crate::ring::Consumer<Envelope>>>, direction| {
            rings
                .into_iter()
                .enumerate()
                .filter_map(|(peer, ring)| {
                    let counters = pair(peer, false, direction);
                    ring.map(|ring| Inbox::new(ring, counters, direction))
                })
                .collect()
        };
        Self {
            id,
            handle: shared.handles[id].clone(),
            requests_out: outboxes(parts.requests_out, Direction::Requests),
            responses_out: outboxes(parts.responses_out, Direction::Responses),
            requests_in: RefCell::new(inboxes(parts.requests_in, Direction::Requests)),
            responses_in: RefCell::new(inboxes(parts.responses_in, Direction::Responses)),
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
            shared,
        }
    }

    pub(crate) fn counters(&self) -> &ShardCounters {
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
    pub(crate) fn check_target(&self, target: usize) -> Result<()> {
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

    pub(crate) fn send_request(&self, to: usize, message: Envelope) {
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

    /// Pushes every FIFO that holds items onto its ring now.
    pub(crate) fn flush_all(&self) {
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
        let counters = self.counters();
        counters.polls.add(1);
        let polls = counters.polls.get();

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
    pub(crate) fn run_until(
        &self,
        until: Option<Instant>,
        mut done: impl FnMut(bool) -> bool,
    ) -> bool {
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
            if self.shared.config.overprovisioned {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    pub(crate) fn is_overprovisioned(&self) -> bool {
        self.shared.config.overprovisioned
    }

    pub(crate) fn is_closing(&self) -> bool {
        if !self.closing_seen.get() && self.shared.closing.load(Ordering::Acquire) {
            self.closing_seen.set(true);
        }
        self.closing_seen.get()
    }

    pub(crate) fn may_stop(&self) -> bool {
        if !self.is_closing() {
            return false;
        }
        if self.shared.forced.load(Ordering::Acquire) {
            return true;
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

    pub(crate) fn block_on<F: Future>(&self, future: F) -> F::Output {
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
