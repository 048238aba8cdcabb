//! The queue matrix: for N shards, one ring per ordered pair of distinct
//! shards, and the sender-side batching in front of each ring.
//!
//! The runtime builds two matrices, one for requests and one for responses,
//! so there are N*(N-1) rings of each kind. Each shard receives the producer
//! halves of its outgoing rings ([`Outbox`], indexed by destination) and the
//! consumer halves of its incoming rings (indexed by source).
//!
//! Batching follows Seastar's `smp_message_queue`: items first go into the
//! outbox's FIFO; the FIFO is pushed onto the ring when it reaches the batch
//! size, and whatever remains is pushed when the sender's poll ends. If the
//! ring is full the items simply stay in the FIFO for a later poll: nothing is
//! dropped and the sender never waits.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::ring::{self, Consumer, Producer};
use crate::stats::QueueCounters;

/// The two halves of every ring of an N-shard matrix, handed out per shard.
pub(crate) struct Matrix<T> {
    /// `outgoing[from][to]`: the producer of ring `from -> to`.
    pub(crate) outgoing: Vec<Vec<Option<Producer<T>>>>,
    /// `incoming[to][from]`: the consumer of ring `from -> to`.
    pub(crate) incoming: Vec<Vec<Option<Consumer<T>>>>,
}

impl<T: Send> Matrix<T> {
    /// Creates N*(N-1) rings of `capacity` items each.
    pub(crate) fn new(shards: usize, capacity: usize) -> Self {
        let mut outgoing: Vec<Vec<Option<Producer<T>>>> = (0..shards)
            .map(|_| (0..shards).map(|_| None).collect())
            .collect();
        let mut incoming: Vec<Vec<Option<Consumer<T>>>> = (0..shards)
            .map(|_| (0..shards).map(|_| None).collect())
            .collect();
        for from in 0..shards {
            for to in (0..shards).filter(|&to| to != from) {
                let (producer, consumer) = ring::channel(capacity);
                outgoing[from][to] = Some(producer);
                incoming[to][from] = Some(consumer);
            }
        }
        Self { outgoing, incoming }
    }
}

/// Which of the two matrices a ring belongs to. It selects the counters
/// an end feeds: a request outbox counts `sent` and `batches`, a request
/// inbox `received`; a response inbox counts `completed` on the pair's
/// sender counters, and a response outbox counts nothing (the completion is
/// counted by the shard that receives it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Calls on their way to their target.
    Requests,
    /// Finished calls on their way back to their origin.
    Responses,
}

/// The sending end of one ring with its batching FIFO.
pub(crate) struct Outbox<T> {
    ring: Producer<T>,
    pending: VecDeque<T>,
    batch: usize,
    counters: Arc<QueueCounters>,
    direction: Direction,
}

impl<T: Send> Outbox<T> {
    pub(crate) fn new(
        ring: Producer<T>,
        batch: usize,
        counters: Arc<QueueCounters>,
        direction: Direction,
    ) -> Self {
        Self {
            ring,
            pending: VecDeque::with_capacity(batch),
            batch: batch.max(1),
            counters,
            direction,
        }
    }

    /// Queues `item`; returns `true` when the FIFO reached the batch size and
    /// the caller should flush now.
    #[inline]
    pub(crate) fn send(&mut self, item: T) -> bool {
        self.pending.push_back(item);
        if self.direction == Direction::Requests {
            self.counters.sender.sent.add(1);
        }
        self.pending.len() >= self.batch
    }

    /// Pushes as much of the FIFO as fits onto the ring with one publication.
    /// Returns how many items moved.
    pub(crate) fn flush(&mut self) -> usize {
        let moved = self.ring.push_from(&mut self.pending);
        if self.direction == Direction::Requests {
            if moved > 0 {
                self.counters.sender.batches.add(1);
            }
            self.counters
                .sender
                .max_pending
                .max(self.pending.len() as u64);
        }
        moved
    }

    /// Whether items wait in the FIFO.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// The receiving end of one ring.
pub(crate) struct Inbox<T> {
    ring: Consumer<T>,
    counters: Arc<QueueCounters>,
    direction: Direction,
}

impl<T: Send> Inbox<T> {
    pub(crate) fn new(
        ring: Consumer<T>,
        counters: Arc<QueueCounters>,
        direction: Direction,
    ) -> Self {
        Self {
            ring,
            counters,
            direction,
        }
    }

    /// Moves everything the ring holds into `out`, freeing the slots with one
    /// publication. Returns how many items moved.
    #[inline]
    pub(crate) fn drain_into(&mut self, out: &mut Vec<T>) -> usize {
        let moved = self.ring.pop_into(out, usize::MAX);
        if moved > 0 {
            if self.direction == Direction::Requests {
                self.counters.receiver.received.add(moved as u64);
                self.counters.receiver.max_depth.max(moved as u64);
            } else {
                self.counters.sender.completed.add(moved as u64);
            }
        }
        moved
    }

    /// Whether the ring holds no item, reading the sender's latest index.
    pub(crate) fn is_empty(&mut self) -> bool {
        self.ring.is_empty()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn one_ring_per_ordered_pair() {
        let matrix = Matrix::<u8>::new(4, 8);
        let rings: usize = matrix
            .outgoing
            .iter()
            .map(|row| row.iter().flatten().count())
            .sum();
        assert_eq!(rings, 12);
        for shard in 0..4 {
            assert!(matrix.outgoing[shard][shard].is_none());
            assert!(matrix.incoming[shard][shard].is_none());
        }
    }

    #[test]
    fn items_reach_the_addressed_shard() {
        let mut matrix = Matrix::<(usize, usize)>::new(3, 4);
        for from in 0..3 {
            for to in (0..3).filter(|&to| to != from) {
                matrix.outgoing[from][to]
                    .as_mut()
                    .unwrap()
                    .push((from, to))
                    .unwrap();
            }
        }
        for to in 0..3 {
            for from in (0..3).filter(|&from| from != to) {
                let got = matrix.incoming[to][from].as_mut().unwrap().pop();
                assert_eq!(got, Some((from, to)));
            }
        }
    }

    #[test]
    fn outbox_batches_and_keeps_overflow() {
        let (producer, consumer) = ring::channel(4);
        let counters = Arc::new(QueueCounters::default());
        let mut outbox = Outbox::new(producer, 3, counters.clone(), Direction::Requests);
        let mut inbox = Inbox::new(consumer, counters.clone(), Direction::Requests);
        assert!(!outbox.send(0));
        assert!(!outbox.send(1));
        assert!(outbox.send(2), "the third item completes a batch");
        for i in 3..10 {
            outbox.send(i);
        }
        assert_eq!(outbox.flush(), 4);
        assert!(outbox.has_pending());
        let mut out = Vec::new();
        assert_eq!(inbox.drain_into(&mut out), 4);
        while outbox.has_pending() {
            outbox.flush();
            inbox.drain_into(&mut out);
        }
        assert_eq!(out, (0..10).collect::<Vec<_>>());
        assert_eq!(counters.sender.sent.get(), 10);
        assert_eq!(counters.sender.batches.get(), 3);
        assert_eq!(counters.sender.max_pending.get(), 6);
        assert_eq!(counters.receiver.received.get(), 10);
        assert_eq!(counters.receiver.max_depth.get(), 4);
    }
}
