//! Per-shard timers: an ordered map from deadline to waker, consulted by the
//! poll loop and used to bound the sleep.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::shard::with_shard;

/// The timers of one shard.
#[derive(Default)]
pub(crate) struct Timers {
    entries: BTreeMap<(Instant, u64), Waker>,
    next_id: u64,
}

impl Timers {
    fn insert(&mut self, deadline: Instant, waker: Waker) -> u64 {
        self.next_id += 1;
        self.entries.insert((deadline, self.next_id), waker);
        self.next_id
    }

    fn update(&mut self, key: (Instant, u64), waker: &Waker) {
        if let Some(old) = self.entries.get_mut(&key) {
            if !old.will_wake(waker) {
                *old = waker.clone();
            }
        }
    }

    fn remove(&mut self, key: (Instant, u64)) {
        self.entries.remove(&key);
    }

    /// Takes the wakers of every timer due at `now`.
    pub(crate) fn expired(&mut self, now: Instant, out: &mut Vec<Waker>) {
        while let Some(entry) = self.entries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            out.push(entry.remove());
        }
    }

    /// The earliest deadline, if any timer is set.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.entries.keys().next().map(|(deadline, _)| *deadline)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Completes after `duration`, measured on the current shard's timers.
///
/// # Panics
/// When polled outside a shard.
pub fn sleep(duration: Duration) -> Sleep {
    Sleep {
        deadline: Instant::now() + duration,
        key: None,
    }
}

/// The future returned by [`sleep`].
#[derive(Debug)]
pub struct Sleep {
    deadline: Instant,
    key: Option<(Instant, u64)>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            if let Some(key) = self.key.take() {
                let _ = with_shard(|shard| shard.timers.borrow_mut().remove(key));
            }
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        let key = self.key;
        let new_key = with_shard(|shard| {
            let mut timers = shard.timers.borrow_mut();
            match key {
                Some(key) => {
                    timers.update(key, cx.waker());
                    key
                }
                None => (deadline, timers.insert(deadline, cx.waker().clone())),
            }
        })
        .expect("shardloop_core::sleep must be awaited on a shard");
        self.key = Some(new_key);
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let _ = with_shard(|shard| shard.timers.borrow_mut().remove(key));
        }
    }
}
