//! The [`Runtime`]: builds the shards, starts their threads (shard 0 is the
//! thread that builds the runtime), and stops them.

use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::config::Config;
use crate::context::Enter;
use crate::driver::Driver;
use crate::error::BuildError;
use crate::executor::RemoteWakes;
use crate::matrix::Matrix;
use crate::message::Envelope;
use crate::placement::{self, Placement};
use crate::reactor::WAKE_TOKEN;
use crate::shard::{Parts, Shard, ShardHandle, Shared};
use crate::stats::Stats;
use crate::wake::SleepFlag;

/// Configures and builds a [`Runtime`].
#[derive(Debug, Clone, Default)]
pub struct Builder {
    config: Config,
}

impl Builder {
    /// The number of shards; by default one per available core. Zero, or
    /// more than [`MAX_SHARDS`], is an error at [`build`](Self::build).
    pub fn shards(mut self, shards: usize) -> Self {
        self.config.shards = Some(shards);
        self
    }

    /// Whether to pin shard `i` to the `i`-th available core, or to the
    /// `i`-th CPU of the [`cpuset`](Self::cpuset) (default `true`). Without
    /// a cpuset, more shards than cores turns it off, with a message; with
    /// one, that is an error unless overprovisioned. Shard 0 is the thread
    /// that builds the runtime.
    pub fn pin(mut self, pin: bool) -> Self {
        self.config.pin = pin;
        self
    }

    /// The CPUs the shards run on (Seastar's `--cpuset`), in the order of
    /// the shards; by default every CPU the process may run on. The number
    /// of shards then defaults to their number. Pinned, shard `i` runs on
    /// `cpus[i]`; unpinned or overprovisioned, every shard may run on any of
    /// them. At [`build`](Self::build), a CPU named twice, one the process
    /// may not run on, or fewer CPUs than shards (unless overprovisioned) is
    /// an error.
    pub fn cpuset(mut self, cpus: impl IntoIterator<Item = usize>) -> Self {
        self.config.cpuset = Some(cpus.into_iter().collect());
        self
    }

    /// Whether the shards share their cores with other busy threads (a load
    /// generator on the same machine, a laptop, a container with a CPU
    /// quota); default `false`. Then shards are not pinned, and a shard that
    /// polls while idle yields its core (`sched_yield`) between looks
    /// instead of spinning, so a thread it shares the core with can run.
    /// Pinned, spinning shards suit cores of their own.
    pub fn overprovisioned(mut self, overprovisioned: bool) -> Self {
        self.config.overprovisioned = overprovisioned;
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

    /// The stack size of the threads of shards 1..N, in bytes (default:
    /// Rust's, 2 MiB; shard 0 is the calling thread). Code that recurses
    /// deeply, an interpreter running on the shard say, may need more.
    pub fn stack_size(mut self, bytes: usize) -> Self {
        self.config.stack_size = Some(bytes);
        self
    }

    /// Starts shards 1..N on their own threads and makes the calling thread
    /// shard 0.
    pub fn build(self) -> Result<Runtime, BuildError> {
        Runtime::start(self.config, None)
    }

    /// Like [`build`](Self::build), but each of shards 1..N runs `main`
    /// instead of the built-in loop, and `main` drives its shard through the
    /// [`Driver`] it is given (this is how another event loop, such as
    /// Python's, runs on a shard). Shard 0's driver comes from
    /// [`Runtime::driver`]. `main` should return once [`Driver::may_stop`]
    /// says so.
    pub fn build_driven<M>(self, main: M) -> Result<Runtime, BuildError>
    where
        M: Fn(Driver) + Send + Sync + 'static,
    {
        Runtime::start(self.config, Some(Arc::new(main)))
    }
}

/// A running set of shards. Dropping it shuts them down gracefully.
pub struct Runtime {
    shared: Arc<Shared>,
    shard0: Rc<Shard>,
    threads: Vec<thread::JoinHandle<()>>,
    pinned: bool,
    /// Gives the calling thread (shard 0) its own affinity back once the
    /// runtime is gone. Declared last: dropped after the shards stopped.
    _affinity: Option<AffinityGuard>,
}

/// A thread's CPU affinity, put back when dropped (on the same thread: it
/// lives in the `!Send` runtime).
struct AffinityGuard {
    saved: libc::cpu_set_t,
}

impl AffinityGuard {
    /// Saves the calling thread's affinity, or `None` if it cannot be read.
    fn save() -> Option<Self> {
        placement::current_affinity().map(|saved| Self { saved })
    }
}

impl Drop for AffinityGuard {
    fn drop(&mut self) {
        placement::set_affinity(&self.saved);
    }
}

/// What a driven runtime runs on shards 1..N.
type ThreadMain = Arc<dyn Fn(Driver) + Send + Sync>;

/// The most shards a runtime may have (Seastar's `max_cpus` is the same).
pub const MAX_SHARDS: usize = 256;

/// Numbers the runtimes of the process (see [`crate::runtime_id`]).
static SERIALS: AtomicU64 = AtomicU64::new(1);

impl Runtime {
    /// A builder with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn start(config: Config, main: Option<ThreadMain>) -> Result<Self, BuildError> {
        let (count, placement) = placement::plan(&config)?;
        let pinned = matches!(placement, Placement::Pinned(_));

        let mut polls = Vec::with_capacity(count);
        let mut handles = Vec::with_capacity(count);
        for _ in 0..count {
            let poll =
                mio::Poll::new().map_err(BuildError::io("creating a shard's epoll instance"))?;
            let waker = mio::Waker::new(poll.registry(), WAKE_TOKEN)
                .map_err(BuildError::io("creating a shard's eventfd"))?;
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
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
            closing: AtomicBool::new(false),
            forced: AtomicBool::new(false),
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
            let affinity = placement.affinity(parts.id);
            let mut thread = thread::Builder::new().name(format!("shard-{}", parts.id));
            if let Some(bytes) = config.stack_size {
                thread = thread.stack_size(bytes);
            }
            let thread = thread
                .spawn(move || {
                    if let Some(affinity) = &affinity {
                        placement::set_affinity(affinity);
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
                .map_err(BuildError::io("spawning a shard thread"))?;
            threads.push(thread);
        }
        let shard0_affinity = placement.affinity(0);
        let affinity = shard0_affinity.as_ref().and_then(|_| AffinityGuard::save());
        if let Some(shard0_affinity) = &shard0_affinity {
            placement::set_affinity(shard0_affinity);
        }
        let shard0 = Rc::new(Shard::new(parts.pop().expect("shard 0"), shared.clone()));
        Ok(Self {
            shared,
            shard0,
            threads,
            pinned,
            _affinity: affinity,
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

    /// Stops accepting calls (they fail with [`Error::Closed`](crate::Error::Closed)) and tells
    /// every shard to finish what was submitted and stop. Driven shards see
    /// it through [`Driver::may_stop`]; [`shutdown`](Self::shutdown) then
    /// joins them.
    pub fn begin_shutdown(&self) {
        self.shared.close(false);
    }

    /// Like [`begin_shutdown`](Self::begin_shutdown), but the shards stop
    /// without waiting for the calls still in flight: [`Driver::may_stop`]
    /// says yes at once, and a built-in shard loop ends at its next turn.
    /// What was in flight is dropped; a caller still awaiting it is not
    /// answered (a driving loop cancels its tasks). For a runtime that must
    /// stop now: Ctrl-C, or calls that do not finish after a grace period.
    pub fn force_stop(&self) {
        self.shared.close(true);
    }

    /// Whether, at some moment during this call, every call sent between
    /// shards had completed (calls a shard makes to itself are not counted).
    /// Cheap enough to poll while a runtime drains.
    pub fn is_quiet(&self) -> bool {
        self.shared.is_quiet()
    }

    /// Once shutdown has begun: serves shard 0 (the calling thread) for up
    /// to `limit`, or until every shard may stop, and returns whether the
    /// shard threads (1..N) have all ended, so that
    /// [`shutdown`](Self::shutdown) will not block. For a caller that must
    /// stay responsive while the runtime stops (to signals, say): call it
    /// in a loop, then `shutdown`.
    pub fn serve_until_stopped(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        if !(self.shard0.is_closing() && self.shard0.may_stop()) {
            if let Some(_enter) = Enter::try_new(self.shard0.clone()) {
                self.shard0
                    .run_until(Some(until), |_| self.shard0.may_stop());
            }
        }
        let finished = self.threads.iter().all(thread::JoinHandle::is_finished);
        if !finished {
            thread::sleep(until.saturating_duration_since(Instant::now()));
        }
        finished
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
            let Some(enter) = Enter::try_new(self.shard0.clone()) else {
                eprintln!(
                    "shardloop: a runtime was dropped by its thread as the thread exited, \
                     without a shutdown; its shard threads are left running"
                );
                self.threads.clear();
                return;
            };
            let until = limit.map(|limit| Instant::now() + limit);
            let drained = self.shard0.run_until(until, |_| self.shard0.may_stop());
            self.shard0.exec.clear();
            drop(enter);
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
