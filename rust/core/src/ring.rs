//! A bounded single-producer/single-consumer ring.
//!
//! This is Lamport's wait-free SPSC queue with the two refinements that make
//! it fast on real caches (as in Frank McSherry's "FastForward"-style queues
//! and the `rtrb` crate):
//!
//! * the producer's and the consumer's indices live on separate cache lines,
//!   so the two cores only exchange a line when one side publishes progress;
//! * each side keeps a private copy of the other side's index and re-reads
//!   the shared one only when the private copy says the ring is full (for the
//!   producer) or empty (for the consumer).
//!
//! Both sides move runs of items with a single index publication
//! ([`Producer::push_from`], [`Consumer::pop_into`]), which is what the shard
//! matrix uses: one release store per batch, not per item.
//!
//! Indices are free-running `usize` counters; a slot is `index & mask`, and the
//! number of items in the ring is `tail - head` (wrapping), always in
//! `0..=capacity`.

use std::collections::VecDeque;
use std::fmt;
use std::mem::MaybeUninit;

use crossbeam_utils::CachePadded;

use crate::sync::{Arc, AtomicUsize, Ordering, UnsafeCell};

/// Creates a ring holding at least `capacity` items (rounded up to a power of
/// two, minimum 1) and returns its two halves.
pub fn channel<T: Send>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let capacity = capacity.max(1).next_power_of_two();
    let slots = (0..capacity)
        .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
        .collect();
    let shared = Arc::new(Shared {
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
        slots,
        mask: capacity - 1,
    });
    let producer = Producer {
        shared: shared.clone(),
        tail: 0,
        cached_head: 0,
    };
    let consumer = Consumer {
        shared,
        head: 0,
        cached_tail: 0,
    };
    (producer, consumer)
}

struct Shared<T> {
    /// Next index the consumer reads. Stored only by the consumer, with
    /// `Release` after it has moved the items out of their slots; loaded by the
    /// producer with `Acquire` before it reuses those slots.
    head: CachePadded<AtomicUsize>,
    /// Next index the producer writes. Stored only by the producer, with
    /// `Release` after it has written the items; loaded by the consumer with
    /// `Acquire` before it reads them.
    tail: CachePadded<AtomicUsize>,
    /// Slots `head..tail` (mod capacity) are initialised and owned by the
    /// consumer side; all others are uninitialised and owned by the producer.
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    mask: usize,
}

// SAFETY: the ring moves `T`s from one thread to another, so it needs `T: Send`.
// The slots are shared, but every slot is accessed by exactly one side at a
// time: the ownership split `head..tail` is only moved by the owning side after
// its accesses, with a `Release` store that the other side `Acquire`s before
// touching the slot.
unsafe impl<T: Send> Sync for Shared<T> {}
// SAFETY: as above; `Shared` owns `T`s and may drop them on either thread.
unsafe impl<T: Send> Send for Shared<T> {}

impl<T> Shared<T> {
    fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Moves `value` into the slot of `index`.
    ///
    /// # Safety
    /// The caller is the producer and the slot is free: `index` is in
    /// `tail..head + capacity` as last observed through `head` with `Acquire`.
    unsafe fn write(&self, index: usize, value: T) {
        self.slots[index & self.mask].with_mut(|slot| {
            // SAFETY: the caller owns this free slot; nothing else reads or
            // writes it until the producer publishes a tail past `index`.
            unsafe { (*slot).write(value) };
        });
    }

    /// Hints the CPU to fetch the cache line of slot `index`. Not a memory
    /// access in the language's sense, so it may run while the producer
    /// writes the slot.
    #[inline(always)]
    fn prefetch(&self, index: usize) {
        #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
        self.slots[index & self.mask].with_mut(|slot| {
            // SAFETY: `_mm_prefetch` only hints the cache; it neither reads
            // nor writes the slot and never faults, even for a slot being
            // written by the other side.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(slot.cast())
            }
        });
        #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
        let _ = index;
    }

    /// Moves the value out of the slot of `index`, leaving it uninitialised.
    ///
    /// # Safety
    /// The caller is the consumer (or the last owner, on drop) and the slot is
    /// full: `index` is in `head..tail` as last observed through `tail` with
    /// `Acquire`.
    unsafe fn read(&self, index: usize) -> T {
        self.slots[index & self.mask].with_mut(|slot| {
            // SAFETY: the slot was initialised by the producer and published
            // with `Release`; the caller owns it until it publishes a head past
            // `index`, and reads it at most once.
            unsafe { (*slot).assume_init_read() }
        })
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        // Both halves are gone, so no other thread can touch the ring; the
        // last `Arc` drop has already synchronised with the other half.
        let tail = self.tail.load(Ordering::Relaxed);
        let mut head = self.head.load(Ordering::Relaxed);
        while head != tail {
            // SAFETY: `head..tail` are the initialised slots, each read once.
            drop(unsafe { self.read(head) });
            head = head.wrapping_add(1);
        }
    }
}

/// The sending half of a ring. Not `Clone`: there is exactly one producer.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
    /// Our own tail; the shared one equals it after every publication.
    tail: usize,
    /// A possibly stale copy of the consumer's head; it only lags behind, so
    /// the free space it implies is a safe under-estimate.
    cached_head: usize,
}

impl<T: Send> Producer<T> {
    /// The number of items the ring can hold.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Free slots, re-reading the consumer's head only if the cached copy
    /// shows fewer than `wanted`.
    #[inline]
    fn free_slots(&mut self, wanted: usize) -> usize {
        let capacity = self.shared.capacity();
        let free = capacity - self.tail.wrapping_sub(self.cached_head);
        if free >= wanted {
            return free;
        }
        self.cached_head = self.shared.head.load(Ordering::Acquire);
        capacity - self.tail.wrapping_sub(self.cached_head)
    }

    #[inline]
    fn publish(&mut self, count: usize) {
        self.tail = self.tail.wrapping_add(count);
        self.shared.tail.store(self.tail, Ordering::Release);
    }

    /// Pushes one item, or gives it back if the ring is full.
    pub fn push(&mut self, value: T) -> Result<(), T> {
        if self.free_slots(1) == 0 {
            return Err(value);
        }
        // SAFETY: we are the producer and `free_slots` saw the slot at `tail`
        // free through an `Acquire` load of `head`.
        unsafe { self.shared.write(self.tail, value) };
        self.publish(1);
        Ok(())
    }

    /// Moves items from `items` into the free slots, taking no more than fit,
    /// and publishes them with a single store. Returns how many moved; the
    /// rest stay in the iterator. (If `items` panics, the items already moved
    /// are leaked, never exposed half-published.)
    pub fn push_iter(&mut self, items: &mut impl Iterator<Item = T>) -> usize {
        let free = self.free_slots(items.size_hint().0.max(1));
        let mut count = 0;
        while count < free {
            let Some(value) = items.next() else { break };
            // SAFETY: we are the producer and `tail + count` is below the
            // `head + capacity` that `free_slots` observed with `Acquire`.
            unsafe { self.shared.write(self.tail.wrapping_add(count), value) };
            count += 1;
        }
        if count > 0 {
            self.publish(count);
        }
        count
    }

    /// Moves as many items as fit from the front of `src` into the ring and
    /// publishes them with a single store. Returns how many moved.
    pub fn push_from(&mut self, src: &mut VecDeque<T>) -> usize {
        let count = self.free_slots(src.len()).min(src.len());
        self.push_iter(&mut src.drain(..count))
    }

    /// Whether the consumer half has been dropped.
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.shared) == 1
    }
}

/// The receiving half of a ring. Not `Clone`: there is exactly one consumer.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    /// Our own head; the shared one equals it after every publication.
    head: usize,
    /// A possibly stale copy of the producer's tail; it only lags behind, so
    /// the item count it implies is a safe under-estimate.
    cached_tail: usize,
}

impl<T: Send> Consumer<T> {
    /// The number of items the ring can hold.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Items ready to read, re-reading the producer's tail only if the cached
    /// copy shows fewer than `wanted`.
    #[inline]
    fn ready_slots(&mut self, wanted: usize) -> usize {
        let ready = self.cached_tail.wrapping_sub(self.head);
        if ready >= wanted {
            return ready;
        }
        // The next slot's address does not depend on the tail: start fetching
        // its line now so that its miss overlaps the tail's.
        self.shared.prefetch(self.head);
        self.cached_tail = self.shared.tail.load(Ordering::Acquire);
        self.cached_tail.wrapping_sub(self.head)
    }

    #[inline]
    fn publish(&mut self, count: usize) {
        self.head = self.head.wrapping_add(count);
        self.shared.head.store(self.head, Ordering::Release);
    }

    /// Pops one item, if any.
    pub fn pop(&mut self) -> Option<T> {
        if self.ready_slots(1) == 0 {
            return None;
        }
        // SAFETY: we are the consumer and `ready_slots` saw the slot at `head`
        // filled through an `Acquire` load of `tail`.
        let value = unsafe { self.shared.read(self.head) };
        self.publish(1);
        Some(value)
    }

    /// Hands up to `max` items to `take`, in order, and frees their slots with
    /// a single store. Returns how many were taken. If `take` panics, the
    /// items it already received are still freed.
    pub fn pop_with(&mut self, max: usize, mut take: impl FnMut(T)) -> usize {
        let count = self.ready_slots(max).min(max);
        /// Publishes the items taken so far, also when `take` unwinds.
        struct Taken<'a, T: Send> {
            consumer: &'a mut Consumer<T>,
            count: usize,
        }
        impl<T: Send> Drop for Taken<'_, T> {
            fn drop(&mut self) {
                if self.count > 0 {
                    self.consumer.publish(self.count);
                }
            }
        }
        let mut taken = Taken {
            consumer: self,
            count: 0,
        };
        while taken.count < count {
            let index = taken.consumer.head.wrapping_add(taken.count);
            // SAFETY: we are the consumer and `index` is below the `tail` that
            // `ready_slots` observed with `Acquire`; counting it as taken
            // before `take` runs means it is read exactly once.
            let value = unsafe { taken.consumer.shared.read(index) };
            taken.count += 1;
            take(value);
        }
        count
    }

    /// Moves up to `max` items into `out` and frees their slots with a single
    /// store. Returns how many moved.
    pub fn pop_into(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        let ready = self.ready_slots(max).min(max);
        out.reserve(ready);
        self.pop_with(ready, |value| out.push(value))
    }

    /// Whether the ring holds no item, reading the producer's latest tail.
    pub fn is_empty(&mut self) -> bool {
        self.ready_slots(1) == 0
    }

    /// Whether the producer half has been dropped.
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.shared) == 1
    }
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.shared.capacity())
            .field("tail", &self.tail)
            .finish()
    }
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.shared.capacity())
            .field("head", &self.head)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize as StdAtomicUsize;
    use std::thread;

    /// Scaled down under miri, which runs about a thousand times slower.
    const ITEMS: usize = if cfg!(miri) { 2_000 } else { 200_000 };

    #[test]
    fn capacity_rounds_up_to_a_power_of_two() {
        assert_eq!(channel::<u8>(0).0.capacity(), 1);
        assert_eq!(channel::<u8>(5).0.capacity(), 8);
        assert_eq!(channel::<u8>(64).1.capacity(), 64);
    }

    #[test]
    fn push_pop_in_order_and_full_gives_back() {
        let (mut tx, mut rx) = channel(4);
        assert!(rx.is_empty());
        for i in 0..4 {
            tx.push(i).unwrap();
        }
        assert_eq!(tx.push(99), Err(99));
        assert_eq!(rx.pop(), Some(0));
        tx.push(4).unwrap();
        let mut out = Vec::new();
        assert_eq!(rx.pop_into(&mut out, usize::MAX), 4);
        assert_eq!(out, [1, 2, 3, 4]);
        assert_eq!(rx.pop(), None);
    }

    #[test]
    fn batches_move_what_fits_and_keep_the_rest() {
        let (mut tx, mut rx) = channel(8);
        let mut pending: VecDeque<u32> = (0..20).collect();
        assert_eq!(tx.push_from(&mut pending), 8);
        assert_eq!(pending.len(), 12);
        assert_eq!(tx.push_from(&mut pending), 0);
        let mut out = Vec::new();
        assert_eq!(rx.pop_into(&mut out, 3), 3);
        assert_eq!(tx.push_from(&mut pending), 3);
        assert_eq!(rx.pop_into(&mut out, usize::MAX), 8);
        assert_eq!(out, (0..11).collect::<Vec<_>>());
    }

    #[test]
    fn push_iter_takes_only_what_fits() {
        let (mut tx, mut rx) = channel(4);
        let mut items = 0..10;
        assert_eq!(tx.push_iter(&mut items), 4);
        assert_eq!(items.next(), Some(4), "the rest stay in the iterator");
        let mut seen = Vec::new();
        assert_eq!(rx.pop_with(3, |v| seen.push(v)), 3);
        assert_eq!(tx.push_iter(&mut items), 3);
        assert_eq!(rx.pop_with(usize::MAX, |v| seen.push(v)), 4);
        assert_eq!(seen, [0, 1, 2, 3, 5, 6, 7]);
    }

    #[test]
    fn pop_with_frees_what_it_took_when_the_callback_panics() {
        let (mut tx, mut rx) = channel(8);
        assert_eq!(tx.push_iter(&mut (0..6).map(Box::new)), 6);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rx.pop_with(usize::MAX, |v| assert!(*v < 2, "stop at 2"));
        }));
        assert!(result.is_err());
        // 0, 1 and 2 were taken (2 inside the panicking call); 3.. remain.
        assert_eq!(rx.pop().map(|b| *b), Some(3));
        let mut rest = Vec::new();
        rx.pop_into(&mut rest, usize::MAX);
        assert_eq!(rest.into_iter().map(|b| *b).collect::<Vec<_>>(), [4, 5]);
    }

    #[test]
    fn indices_wrap_around() {
        let (mut tx, mut rx) = channel(4);
        // Start both sides just below the wrap of the index space.
        let start = usize::MAX - 5;
        tx.tail = start;
        tx.cached_head = start;
        rx.head = start;
        rx.cached_tail = start;
        tx.shared.head.store(start, Ordering::Relaxed);
        tx.shared.tail.store(start, Ordering::Relaxed);
        for round in 0..6 {
            let mut batch: VecDeque<usize> = (round * 3..round * 3 + 3).collect();
            assert_eq!(tx.push_from(&mut batch), 3);
            let mut out = Vec::new();
            assert_eq!(rx.pop_into(&mut out, usize::MAX), 3);
            assert_eq!(out, (round * 3..round * 3 + 3).collect::<Vec<_>>());
        }
    }

    #[test]
    fn unread_items_are_dropped_exactly_once() {
        static DROPS: StdAtomicUsize = StdAtomicUsize::new(0);
        struct Counted;
        impl Drop for Counted {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (mut tx, mut rx) = channel(4);
        for _ in 0..3 {
            assert!(tx.push(Counted).is_ok());
        }
        drop(rx.pop());
        assert_eq!(DROPS.load(Ordering::Relaxed), 1);
        assert!(!tx.is_abandoned());
        drop(rx);
        assert!(tx.is_abandoned());
        drop(tx);
        assert_eq!(DROPS.load(Ordering::Relaxed), 3);
    }

    fn transfer(batch: usize, capacity: usize) {
        let (mut tx, mut rx) = channel::<Box<usize>>(capacity);
        let producer = thread::spawn(move || {
            let mut next = 0;
            let mut pending = VecDeque::new();
            while next < ITEMS || !pending.is_empty() {
                while pending.len() < batch && next < ITEMS {
                    pending.push_back(Box::new(next));
                    next += 1;
                }
                if tx.push_from(&mut pending) == 0 {
                    thread::yield_now();
                }
            }
        });
        let mut expected = 0;
        let mut out = Vec::new();
        while expected < ITEMS {
            out.clear();
            if rx.pop_into(&mut out, batch) == 0 {
                thread::yield_now();
            }
            for value in out.drain(..) {
                assert_eq!(*value, expected);
                expected += 1;
            }
        }
        producer.join().unwrap();
        assert!(rx.is_empty());
    }

    #[test]
    fn two_threads_single_items() {
        transfer(1, 16);
    }

    #[test]
    fn two_threads_batches_larger_than_the_ring() {
        transfer(64, 32);
    }

    #[test]
    fn two_threads_batches() {
        transfer(16, 256);
    }
}
