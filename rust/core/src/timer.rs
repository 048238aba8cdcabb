//! Per-shard timers: an ordered map from deadline to waker, consulted by the
//! poll loop and used to bound the sleep.

use std::collections::BTreeMap;
use std::task::Waker;
use std::time::Instant;

/// The timers of one shard.
#[derive(Default)]
pub(crate) struct Timers {
    entries: BTreeMap<(Instant, u64), Waker>,
    next_id: u64,
}

impl Timers {
    pub(crate) fn insert(&mut self, deadline: Instant, waker: Waker) -> u64 {
        self.next_id += 1;
        self.entries.insert((deadline, self.next_id), waker);
        self.next_id
    }

    pub(crate) fn update(&mut self, key: (Instant, u64), waker: &Waker) {
        if let Some(old) = self.entries.get_mut(&key) {
            if !old.will_wake(waker) {
                *old = waker.clone();
            }
        }
    }

    pub(crate) fn remove(&mut self, key: (Instant, u64)) {
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
