//! The sleep/wake handshake between a shard going idle and a peer that has
//! just handed it work.
//!
//! A shard polls its rings while busy and only sleeps (in `epoll_wait`) once
//! it has been idle for a while. A sender must wake a sleeping shard, but a
//! syscall per message would cost more than the message itself, so the sender
//! writes the target's eventfd only when the target has announced that it is
//! going to sleep. The danger is the classic lost wake-up: the target checks
//! its rings, finds nothing, the sender publishes an item and sees no
//! announcement, and the target then sleeps with an item in its ring.
//!
//! It is avoided with a Dekker-style handshake (the store-buffering pattern
//! made safe by two `SeqCst` fences, as in Seastar's `smp_message_queue`):
//!
//! ```text
//!   sleeper                               sender
//!   state.store(odd)  // asleep           ring.tail.store(t, Release)
//!   fence(SeqCst)                         fence(SeqCst)
//!   if rings.any_ready() { cancel }       if state.load() is odd { notify() }
//!   else block until notified
//!   state.store(even) // awake
//! ```
//!
//! `state` counts sleeps, so each sender remembers the last sleep it notified
//! and writes the eventfd at most once per sleep, without a read-modify-write
//! on the shared line.
//!
//! The two fences are ordered one before the other in the single total order
//! of `SeqCst` operations. If the sleeper's fence comes first, the sender's
//! load sees `sleeping == true` and notifies; if the sender's fence comes
//! first, the sleeper's re-check sees the new tail and does not block. Either
//! way the item is found. `loom_tests.rs` checks this exhaustively with loom
//! against the real ring.

use crate::sync::{fence, AtomicUsize, Ordering};

/// Whether a shard is (about to be) asleep. One per shard, shared with all
/// peers.
#[derive(Debug, Default)]
pub(crate) struct SleepFlag {
    /// A sleep counter: odd while the shard has announced a sleep, even while
    /// it is awake. Written only by the shard itself; the count lets each
    /// sender notify a given sleep at most once without a read-modify-write.
    state: AtomicUsize,
}

impl SleepFlag {
    /// Creates a flag for an awake shard.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The sleeper's side. Announces the sleep, re-checks for work with
    /// `has_work`, and calls `block` only if there is none. `block` must return
    /// once notified (a notification that arrives before `block` starts must
    /// not be lost, as with an eventfd). Returns whether it blocked.
    pub(crate) fn sleep(&self, has_work: impl FnOnce() -> bool, block: impl FnOnce()) -> bool {
        let awake = self.state.load(Ordering::Relaxed);
        debug_assert!(awake % 2 == 0, "sleep() is only called by the awake shard");
        self.state.store(awake.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let blocked = !has_work();
        if blocked {
            block();
        }
        self.state.store(awake.wrapping_add(2), Ordering::Relaxed);
        blocked
    }

    /// The sender's side, called after it has published work for this shard.
    /// Returns `true` when the caller must notify the shard. `notified` is the
    /// caller's own record of the last sleep it notified (start at 0); a sleep
    /// is notified at most once by each sender.
    #[inline]
    pub(crate) fn must_notify(&self, notified: &mut usize) -> bool {
        fence(Ordering::SeqCst);
        let state = self.state.load(Ordering::Relaxed);
        if state % 2 == 1 && state != *notified {
            *notified = state;
            return true;
        }
        false
    }
}
