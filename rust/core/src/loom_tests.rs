//! Model checks of the lock-free protocols (the ring and the sleep/wake
//! handshake), run with `make loom`:
//! `RUSTFLAGS="--cfg loom" cargo test --release -p shardloop-core --lib loom_tests`.

use std::collections::VecDeque;

use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

use crate::ring;
use crate::wake::SleepFlag;

/// An eventfd: a notification posted before the wait is not lost.
#[derive(Default)]
struct EventFd {
    posted: Mutex<bool>,
    condvar: Condvar,
}

impl EventFd {
    fn notify(&self) {
        *self.posted.lock().unwrap() = true;
        self.condvar.notify_one();
    }

    fn wait(&self) {
        let mut posted = self.posted.lock().unwrap();
        while !*posted {
            posted = self.condvar.wait(posted).unwrap();
        }
        *posted = false;
    }
}

/// A consumer that sleeps whenever its ring looks empty always receives every
/// item: loom reports a deadlock if any interleaving loses a wake-up.
#[test]
fn no_lost_wakeup() {
    loom::model(|| {
        const ITEMS: usize = 2;
        let (mut tx, mut rx) = ring::channel::<usize>(2);
        let flag = Arc::new(SleepFlag::new());
        let eventfd = Arc::new(EventFd::default());

        let sender = {
            let (flag, eventfd) = (flag.clone(), eventfd.clone());
            thread::spawn(move || {
                let mut notified = 0;
                for item in 0..ITEMS {
                    let mut batch = VecDeque::from([item]);
                    while tx.push_from(&mut batch) == 0 {
                        thread::yield_now();
                    }
                    if flag.must_notify(&mut notified) {
                        eventfd.notify();
                    }
                }
            })
        };

        let mut received = Vec::new();
        while received.len() < ITEMS {
            if rx.pop_into(&mut received, usize::MAX) == 0 {
                flag.sleep(|| !rx.is_empty(), || eventfd.wait());
            }
        }
        assert_eq!(received, [0, 1]);
        sender.join().unwrap();
    });
}

/// Items cross the ring in order and intact, batch by batch, with the slots
/// reused after a wrap (capacity 2, three items).
#[test]
fn ring_transfers_through_wraparound() {
    loom::model(|| {
        let (mut tx, mut rx) = ring::channel::<Box<usize>>(2);
        let sender = thread::spawn(move || {
            let mut pending: VecDeque<Box<usize>> = (0..3).map(Box::new).collect();
            while !pending.is_empty() {
                if tx.push_from(&mut pending) == 0 {
                    thread::yield_now();
                }
            }
        });
        let mut received = Vec::new();
        while received.len() < 3 {
            if rx.pop_into(&mut received, usize::MAX) == 0 {
                thread::yield_now();
            }
        }
        assert_eq!(
            received.into_iter().map(|b| *b).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        sender.join().unwrap();
    });
}

/// The real topology: one sleeping shard with a ring from each of two peers,
/// both peers sharing its sleep flag and eventfd.
#[test]
fn two_senders_one_sleeper() {
    loom::model(|| {
        let flag = Arc::new(SleepFlag::new());
        let eventfd = Arc::new(EventFd::default());
        let mut receivers = Vec::new();
        let mut senders = Vec::new();
        for peer in 0..2 {
            let (mut tx, rx) = ring::channel::<usize>(1);
            receivers.push(rx);
            let (flag, eventfd) = (flag.clone(), eventfd.clone());
            senders.push(thread::spawn(move || {
                let mut notified = 0;
                tx.push(peer).unwrap();
                if flag.must_notify(&mut notified) {
                    eventfd.notify();
                }
            }));
        }
        let mut received = Vec::new();
        while received.len() < 2 {
            let mut got = 0;
            for rx in &mut receivers {
                got += rx.pop_into(&mut received, usize::MAX);
            }
            if got == 0 {
                flag.sleep(
                    || receivers.iter_mut().any(|rx| !rx.is_empty()),
                    || eventfd.wait(),
                );
            }
        }
        received.sort_unstable();
        assert_eq!(received, [0, 1]);
        for sender in senders {
            sender.join().unwrap();
        }
    });
}
