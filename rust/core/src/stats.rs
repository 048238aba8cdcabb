//! Counters kept by the shards, and the plain snapshots `stats()` returns.
//!
//! Every counter has a single writer (the shard that owns the event), so it is
//! bumped with a relaxed load and store, not a read-modify-write; readers on
//! other threads see a recent value. A queue's sender-side and receiver-side
//! counters sit on different cache lines, so counting adds no sharing between
//! the two shards.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

/// A counter written by one thread and read by any. Stores are `Release`
/// (free on x86): a reader that acquires a later value of one counter also
/// sees the writer's earlier updates of the others (`Shared::is_quiet`
/// relies on it for `sent` and `completed`).
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        let value = self.0.load(Ordering::Relaxed);
        self.0.store(value + n, Ordering::Release);
    }

    #[inline]
    pub(crate) fn max(&self, n: u64) {
        if n > self.0.load(Ordering::Relaxed) {
            self.0.store(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// The value; what the writer did before storing it is visible to the
    /// reader's later loads (for readers that compare several counters).
    pub(crate) fn get_acquire(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// Counters written by the sending shard of one ordered pair.
#[derive(Debug, Default)]
pub(crate) struct SenderCounters {
    pub(crate) sent: Counter,
    pub(crate) batches: Counter,
    pub(crate) completed: Counter,
    pub(crate) max_pending: Counter,
}

/// Counters written by the receiving shard of one ordered pair.
#[derive(Debug, Default)]
pub(crate) struct ReceiverCounters {
    pub(crate) received: Counter,
    pub(crate) max_depth: Counter,
}

/// The counters of the request queue `from -> to` (and of the completions
/// that come back on its response queue).
#[derive(Debug, Default)]
pub(crate) struct QueueCounters {
    pub(crate) sender: CachePadded<SenderCounters>,
    pub(crate) receiver: CachePadded<ReceiverCounters>,
}

/// Counters written by one shard about its own loop.
#[derive(Debug, Default)]
pub(crate) struct ShardCounters {
    pub(crate) polls: Counter,
    pub(crate) tasks_run: Counter,
    pub(crate) sleeps: Counter,
    pub(crate) wakeups: Counter,
    /// The shard thread's OS thread id (written once, when it starts; 0
    /// until then).
    pub(crate) tid: AtomicU64,
}

/// A snapshot of one request queue, from shard `from` to shard `to`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// The sending shard.
    pub from: usize,
    /// The receiving shard.
    pub to: usize,
    /// Requests handed to the queue by `from` (including those still waiting
    /// in its overflow FIFO).
    pub sent: u64,
    /// Requests taken off the ring by `to`.
    pub received: u64,
    /// Completions returned to `from`.
    pub completed: u64,
    /// Index publications on the request ring (one per batch).
    pub batches: u64,
    /// The most requests `to` found waiting in the ring at once.
    pub max_depth: u64,
    /// The most requests `from` held in its overflow FIFO at once.
    pub max_pending: u64,
    /// Requests sent and not yet taken off the ring by `to` (those in
    /// `from`'s overflow FIFO included): the queue's depth now.
    pub depth: u64,
    /// Requests sent whose completion has not yet come back to `from`.
    pub in_flight: u64,
}

/// A snapshot of one shard's own loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// The shard index.
    pub shard: usize,
    /// Turns of the poll loop.
    pub polls: u64,
    /// Local task polls.
    pub tasks_run: u64,
    /// Times the shard blocked in its sleep point.
    pub sleeps: u64,
    /// Eventfd notifications this shard sent to sleeping peers.
    pub wakeups: u64,
    /// Times the shard's thread lost its core while it could still run
    /// (Linux's `nonvoluntary_ctxt_switches`): other busy threads share the
    /// core. Pinned, polling shards want this near zero; an
    /// [`overprovisioned`](crate::Builder::overprovisioned) shard counts here
    /// too each time it yields its core to another thread.
    pub preempted: u64,
}

/// A snapshot of all counters of a runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// One entry per ordered pair of distinct shards, ordered by `(from, to)`.
    pub queues: Vec<QueueStats>,
    /// One entry per shard.
    pub shards: Vec<ShardStats>,
}

/// A runtime's counters, readable from any thread (a metrics exporter's,
/// say) for as long as it is held; once the runtime has stopped, their last
/// values. It holds the counters alone, not the runtime's other resources.
#[derive(Debug, Clone)]
pub struct StatsReader {
    pub(crate) queues: Vec<std::sync::Arc<QueueCounters>>,
    pub(crate) shards: std::sync::Arc<[CachePadded<ShardCounters>]>,
}

impl StatsReader {
    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        snapshot_from(&self.queues, &self.shards)
    }
}

pub(crate) fn snapshot_from(
    queues: &[std::sync::Arc<QueueCounters>],
    shards: &[CachePadded<ShardCounters>],
) -> Stats {
    let count = shards.len();
    let queues = (0..count)
        .flat_map(|from| (0..count).map(move |to| (from, to)))
        .filter(|(from, to)| from != to)
        .map(|(from, to)| {
            let q = &queues[from * count + to];
            // Read before `sent` (acquiring what was counted before them),
            // so that neither exceeds the `sent` read after.
            let received = q.receiver.received.get_acquire();
            let completed = q.sender.completed.get_acquire();
            let sent = q.sender.sent.get_acquire();
            QueueStats {
                from,
                to,
                sent,
                received,
                completed,
                depth: sent.saturating_sub(received),
                in_flight: sent.saturating_sub(completed),
                batches: q.sender.batches.get(),
                max_depth: q.receiver.max_depth.get(),
                max_pending: q.sender.max_pending.get(),
            }
        })
        .collect();
    let shards = shards
        .iter()
        .enumerate()
        .map(|(shard, c)| ShardStats {
            shard,
            polls: c.polls.get(),
            tasks_run: c.tasks_run.get(),
            sleeps: c.sleeps.get(),
            wakeups: c.wakeups.get(),
            preempted: preemptions(c.tid.load(Ordering::Acquire)),
        })
        .collect();
    Stats { queues, shards }
}

/// The OS thread id of the calling thread.
pub(crate) fn this_tid() -> u64 {
    // SAFETY: `gettid` has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    u64::try_from(tid).unwrap_or(0)
}

/// Involuntary context switches of thread `tid` of this process, from
/// `/proc` (0 if they cannot be read: no such thread, or no procfs).
fn preemptions(tid: u64) -> u64 {
    if tid == 0 {
        return 0;
    }
    std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
        .ok()
        .and_then(|status| nonvoluntary_switches(&status))
        .unwrap_or(0)
}

/// The `nonvoluntary_ctxt_switches` figure of a `/proc/.../status` text.
fn nonvoluntary_switches(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("nonvoluntary_ctxt_switches:"))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preemptions_are_read_from_proc_for_a_live_thread() {
        // SAFETY: `usage` is a valid, writable `rusage`; RUSAGE_THREAD is the
        // calling thread.
        let before = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
            usage.ru_nivcsw as u64
        };
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert!(status.contains("nonvoluntary_ctxt_switches:"));
        // The figure is parsed, not defaulted: a live thread's status has one.
        assert!(nonvoluntary_switches(&status).is_some());
        let sample = "voluntary_ctxt_switches:\t7\nnonvoluntary_ctxt_switches:\t42\n";
        assert_eq!(nonvoluntary_switches(sample), Some(42));
        assert!(preemptions(this_tid()) >= before);
        assert_eq!(preemptions(0), 0);
        assert_eq!(preemptions(u64::from(u32::MAX)), 0, "no such thread");
    }
}
