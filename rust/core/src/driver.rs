//! Driving a shard from another event loop (such as Python's asyncio).

use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::context::Enter;
use crate::shard::Shard;
use crate::stats::{Stats, StatsReader};

/// Lets another event loop drive a shard: while that loop runs it keeps the
/// driver [activated](Self::activate), and calls [`poll`](Self::poll) or
/// [`wait`](Self::wait) where it would otherwise wait for I/O, handling its
/// own work when they return. `!Send`: it never leaves the shard's thread.
pub struct Driver {
    pub(crate) shard: Rc<Shard>,
}

/// While alive, the driver's shard is the thread's current shard (see
/// [`Driver::activate`]); dropping it restores the previous one.
pub struct Activation {
    _current: Enter,
}

impl Driver {
    /// Makes this driver's shard the thread's current shard (what
    /// [`submit_to`](crate::submit_to), [`send`](crate::embed::send) and the other free functions act on) until the
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

    /// Whether the runtime was built
    /// [`overprovisioned`](crate::Builder::overprovisioned): a driver that
    /// spins should then yield its core between looks.
    pub fn is_overprovisioned(&self) -> bool {
        self.shard.is_overprovisioned()
    }

    /// One turn of the shard's loop, without waiting. Returns whether it found
    /// anything to do.
    pub fn poll(&self) -> bool {
        self.shard.poll_once()
    }

    /// Turns the shard's loop (spinning for `idle_poll`, then sleeping) until
    /// [`wake_driver`](crate::embed::wake_driver) was called by a message or task of this shard, a
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

    /// Whether the runtime was stopped without waiting for the calls in
    /// flight ([`Runtime::force_stop`](crate::Runtime::force_stop)): calls
    /// that arrived but have not run yet should be dropped, not run.
    pub fn is_force_stopped(&self) -> bool {
        self.shard.shared.forced.load(Ordering::Acquire)
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

    /// The runtime's counters, for reading from any thread.
    pub fn stats_reader(&self) -> StatsReader {
        self.shard.shared.stats_reader()
    }
}
