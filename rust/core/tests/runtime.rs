//! Behaviour of the runtime seen from its public API.

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardloop_core::{
    invoke_on_all, shard_count, shard_id, sleep, spawn_local, submit_to, submit_to_async, Async,
    BuildError, Error, Runtime,
};

fn runtime(shards: usize) -> Runtime {
    Runtime::builder()
        .shards(shards)
        .pin(false)
        .build()
        .unwrap()
}

#[test]
fn submit_to_runs_on_the_target_shard() {
    let rt = runtime(3);
    let ids = rt.block_on(async {
        let mut ids = Vec::new();
        for target in 0..3 {
            ids.push(
                submit_to(target, move || (target, shard_id()))
                    .await
                    .unwrap(),
            );
        }
        ids
    });
    assert_eq!(ids, [(0, Some(0)), (1, Some(1)), (2, Some(2))]);
}

#[test]
fn futures_run_as_tasks_on_the_target() {
    let rt = runtime(2);
    let got = rt.block_on(async {
        submit_to_async(1, || async {
            // Not Send: it lives on shard 1 only.
            let local = Rc::new(Cell::new(1));
            sleep(Duration::from_millis(5)).await;
            local.set(local.get() + 1);
            (local.get(), shard_id())
        })
        .await
    });
    assert_eq!(got, Ok((2, Some(1))));
}

#[test]
fn local_target_runs_inline() {
    let rt = runtime(2);
    rt.block_on(async {
        let ran = Arc::new(AtomicUsize::new(0));
        let flag = ran.clone();
        let call = submit_to(0, move || flag.fetch_add(1, Ordering::Relaxed));
        assert_eq!(ran.load(Ordering::Relaxed), 1, "ran before the first poll");
        assert_eq!(call.await, Ok(0));
    });
}

#[test]
fn nested_calls_between_shards() {
    let rt = runtime(3);
    let got = rt.block_on(async {
        submit_to_async(1, || async {
            submit_to(2, || shard_id().unwrap() * 10).await.unwrap() + 1
        })
        .await
    });
    assert_eq!(got, Ok(21));
}

#[test]
fn invoke_on_all_returns_results_in_shard_order() {
    let rt = runtime(4);
    let got = rt.block_on(invoke_on_all(|| shard_id().unwrap() * 2));
    assert_eq!(got, Ok(vec![0, 2, 4, 6]));
    assert_eq!(rt.block_on(async { shard_count() }), Some(4));
}

#[test]
fn bad_shard_index_names_the_range_and_sends_nothing() {
    let rt = runtime(2);
    let err = rt
        .block_on(async { submit_to(7, || ()).await })
        .unwrap_err();
    assert_eq!(err, Error::NoSuchShard { shard: 7, count: 2 });
    assert!(
        err.to_string().contains("the runtime has 2 shards, 0 to 1"),
        "{err}"
    );
    assert!(rt.stats().queues.iter().all(|q| q.sent == 0));
}

#[test]
fn off_a_shard_is_an_error() {
    let err = futures_lite_block_on(submit_to(0, || ()));
    assert_eq!(err, Err(Error::NotOnShard));
    assert_eq!(shard_id(), None);
}

/// Polls a future once on a thread that is not a shard.
fn futures_lite_block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(value) => value,
        Poll::Pending => panic!("expected an immediate result"),
    }
}

#[test]
fn more_shards_than_the_most_is_an_error() {
    let err = Runtime::builder()
        .shards(shardloop_core::MAX_SHARDS + 1)
        .pin(false)
        .build()
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            BuildError::TooManyShards {
                shards: 257,
                max: 256
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("at most 256"), "{err}");
}

#[test]
fn zero_shards_is_an_error() {
    let err = Runtime::builder().shards(0).build().err().unwrap();
    assert!(matches!(err, BuildError::NoShards), "{err}");
}

#[test]
fn a_panic_comes_back_as_an_error_and_the_shard_keeps_serving() {
    let rt = runtime(2);
    rt.block_on(async {
        let err = submit_to(1, || -> u32 { panic!("boom") })
            .await
            .unwrap_err();
        assert_eq!(
            err,
            Error::Panicked {
                shard: 1,
                message: "boom".into()
            }
        );
        let err = submit_to_async(1, || async { panic!("async boom") })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("async boom"), "{err}");
        assert_eq!(submit_to(1, || 5).await, Ok(5));
    });
}

#[test]
fn many_in_flight_overflow_the_ring_without_loss() {
    // A ring of 8 and 5,000 calls in flight: most wait in the overflow FIFO.
    let rt = Runtime::builder()
        .shards(2)
        .pin(false)
        .ring_capacity(8)
        .build()
        .unwrap();
    let sum = rt.block_on(async {
        let calls: Vec<_> = (0..5_000u64).map(|i| submit_to(1, move || i)).collect();
        let mut sum = 0;
        for call in calls {
            sum += call.await.unwrap();
        }
        sum
    });
    assert_eq!(sum, (0..5_000).sum::<u64>());
    let stats = rt.stats();
    let queue = stats
        .queues
        .iter()
        .find(|q| q.from == 0 && q.to == 1)
        .unwrap();
    assert_eq!(
        (queue.sent, queue.received, queue.completed),
        (5_000, 5_000, 5_000)
    );
    assert!(queue.max_pending > 8, "{queue:?}");
    assert!(queue.max_depth <= 8, "{queue:?}");
    assert!(queue.batches >= 5_000 / 16, "{queue:?}");
}

#[test]
fn shutdown_finishes_submitted_work() {
    let done = Arc::new(AtomicUsize::new(0));
    let rt = runtime(3);
    let counter = done.clone();
    rt.block_on(async move {
        for target in 1..3 {
            let counter = counter.clone();
            // Submitted, never awaited: shutdown must still run them.
            drop(submit_to_async(target, move || async move {
                sleep(Duration::from_millis(20)).await;
                counter.fetch_add(1, Ordering::SeqCst);
            }));
        }
    });
    rt.shutdown();
    assert_eq!(done.load(Ordering::SeqCst), 2);
}

#[test]
fn submit_after_shutdown_began_is_refused_and_reported() {
    let rt = runtime(2);
    let seen = Arc::new(std::sync::Mutex::new(None));
    let report = seen.clone();
    rt.block_on(async move {
        // Still running when shutdown begins; then it tries another call.
        drop(submit_to_async(1, move || async move {
            sleep(Duration::from_millis(30)).await;
            *report.lock().unwrap() = Some(submit_to(0, || ()).await);
        }));
    });
    rt.shutdown();
    assert_eq!(*seen.lock().unwrap(), Some(Err(Error::Closed)));
}

#[test]
fn a_result_dropped_outside_block_on_does_not_stall_shutdown() {
    let rt = runtime(2);
    #[allow(clippy::async_yields_async)]
    let pending = rt.block_on(async { submit_to(1, || 1) });
    drop(pending);
    rt.shutdown();
}

#[test]
fn spawn_local_and_join() {
    let rt = runtime(1);
    let got = rt.block_on(async {
        let handle = spawn_local(async {
            sleep(Duration::from_millis(2)).await;
            7
        });
        let failing = spawn_local(async { panic!("task failed") });
        (handle.await, failing.await)
    });
    assert_eq!(got.0, Ok(7));
    assert!(matches!(got.1, Err(Error::Panicked { shard: 0, .. })));
}

#[test]
fn sleep_waits_at_least_its_duration() {
    let rt = runtime(2);
    let elapsed = rt.block_on(async {
        submit_to_async(1, || async {
            let start = Instant::now();
            sleep(Duration::from_millis(15)).await;
            start.elapsed()
        })
        .await
    });
    assert!(elapsed.unwrap() >= Duration::from_millis(15));
}

#[test]
fn idle_shards_sleep_and_wake_on_demand() {
    let rt = Runtime::builder()
        .shards(2)
        .pin(false)
        .idle_poll(Duration::ZERO)
        .build()
        .unwrap();
    rt.block_on(async {
        sleep(Duration::from_millis(20)).await;
        for i in 0..50u32 {
            assert_eq!(submit_to(1, move || i + 1).await, Ok(i + 1));
            sleep(Duration::from_millis(1)).await;
        }
    });
    let stats = rt.stats();
    assert!(stats.shards[1].sleeps > 10, "{:?}", stats.shards);
    assert!(stats.shards[0].wakeups > 10, "{:?}", stats.shards);
}

#[test]
fn io_readiness_drives_a_tcp_echo() {
    let rt = runtime(2);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let client = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(b"hello shard").unwrap();
        let mut buf = [0; 11];
        stream.read_exact(&mut buf).unwrap();
        buf
    });
    let served = rt.block_on(async {
        submit_to_async(1, move || async move {
            let listener = Async::new(listener).unwrap();
            let (stream, _) = listener.read_with(|l| l.accept()).await.unwrap();
            stream.set_nonblocking(true).unwrap();
            let stream = Async::new(stream).unwrap();
            let mut buf = [0; 11];
            let mut read = 0;
            while read < buf.len() {
                read += stream
                    .read_with(|mut s| s.read(&mut buf[read..]))
                    .await
                    .unwrap();
            }
            stream.write_with(|mut s| s.write(&buf)).await.unwrap()
        })
        .await
    });
    assert_eq!(served, Ok(11));
    assert_eq!(&client.join().unwrap(), b"hello shard");
}

#[test]
fn stats_count_every_queue() {
    let rt = runtime(3);
    rt.block_on(async {
        for _ in 0..10 {
            submit_to(2, || ()).await.unwrap();
        }
    });
    let stats = rt.stats();
    assert_eq!(stats.queues.len(), 6);
    assert_eq!(stats.shards.len(), 3);
    let q = stats
        .queues
        .iter()
        .find(|q| (q.from, q.to) == (0, 2))
        .unwrap();
    assert_eq!((q.sent, q.received, q.completed), (10, 10, 10));
    assert!(stats
        .queues
        .iter()
        .filter(|q| (q.from, q.to) != (0, 2))
        .all(|q| q.sent == 0));
}

/// (completed on, ran on) of each returned probe.
type Trail = Arc<std::sync::Mutex<Vec<(usize, Option<usize>)>>>;

/// A message that records where it ran and comes back.
struct Probe {
    origin: usize,
    ran_on: Option<usize>,
    done: Trail,
}

impl shardloop_core::embed::Message for Probe {
    fn run(mut self: Box<Self>) {
        self.ran_on = shard_id();
        shardloop_core::embed::wake_driver();
        let origin = self.origin;
        shardloop_core::embed::respond(origin, self);
    }

    fn complete(self: Box<Self>) {
        self.done
            .lock()
            .unwrap()
            .push((shard_id().unwrap(), self.ran_on));
        shardloop_core::embed::wake_driver();
    }
}

#[test]
fn driven_shards_carry_custom_messages_and_stop_together() {
    let loops = Arc::new(AtomicUsize::new(0));
    let counted = loops.clone();
    let rt = Runtime::builder()
        .shards(3)
        .pin(false)
        .build_driven(move |driver| {
            let _active = driver.activate();
            while !driver.may_stop() {
                driver.wait(Some(Duration::from_millis(50)));
            }
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    let done = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let driver = rt.driver();
        let _active = driver.activate();
        assert_eq!((driver.shard_id(), driver.shard_count()), (0, 3));
        for target in [1, 2, 0] {
            let probe = Probe {
                origin: 0,
                ran_on: None,
                done: done.clone(),
            };
            shardloop_core::embed::send(target, Box::new(probe)).unwrap();
        }
        let err = shardloop_core::embed::send(
            3,
            Box::new(Probe {
                origin: 0,
                ran_on: None,
                done: done.clone(),
            }),
        );
        assert_eq!(err, Err(Error::NoSuchShard { shard: 3, count: 3 }));
        let deadline = Instant::now() + Duration::from_secs(10);
        while done.lock().unwrap().len() < 3 && Instant::now() < deadline {
            driver.wait(Some(Duration::from_millis(10)));
        }
        rt.begin_shutdown();
        assert_eq!(shardloop_core::embed::check_target(1), Err(Error::Closed));
        while !driver.may_stop() {
            driver.wait(None);
        }
    }
    rt.shutdown();
    let mut done = done.lock().unwrap().clone();
    done.sort();
    assert_eq!(done, [(0, Some(0)), (0, Some(1)), (0, Some(2))]);
    assert_eq!(loops.load(Ordering::SeqCst), 2);
}

#[test]
fn invoke_on_all_sends_to_the_others_before_running_its_own_part() {
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let rt = runtime(2);
    let got = rt.block_on(invoke_on_all(|| {
        if shard_id() == Some(0) {
            // Only true if shard 1 got its call while this part runs.
            let deadline = Instant::now() + Duration::from_secs(5);
            while STARTED.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
                std::hint::spin_loop();
            }
            STARTED.load(Ordering::SeqCst) == 1
        } else {
            STARTED.store(1, Ordering::SeqCst);
            true
        }
    }));
    assert_eq!(got, Ok(vec![true, true]));
}

/// A peer's data and its close can arrive as one epoll event: a short read
/// that clears the readiness must still find the end of the stream next.
#[test]
fn a_close_reported_with_the_data_is_not_lost_by_a_short_read() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut peer = std::net::TcpStream::connect(addr).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    peer.write_all(b"abc").unwrap();
    drop(peer);
    let rt = runtime(1);
    let outcome = rt.block_on(async move {
        accepted.set_nonblocking(true).unwrap();
        let stream = Async::new(accepted).unwrap();
        let mut buf = [0; 64];
        stream.readable().await;
        let first = stream.get_ref().read(&mut buf).unwrap();
        assert!(first < buf.len(), "a short read");
        stream.clear_readable();
        assert!(stream.is_readable(), "the close is still to be read");
        stream.readable().await;
        let second = stream.get_ref().read(&mut buf).unwrap();
        (first, second)
    });
    assert_eq!(outcome, (3, 0));
}

#[test]
fn an_overprovisioned_runtime_is_not_pinned_and_still_serves() {
    let rt = Runtime::builder()
        .shards(2)
        .overprovisioned(true)
        .build()
        .unwrap();
    assert!(!rt.is_pinned());
    let sum = rt.block_on(async {
        let mut sum = 0;
        for i in 0..1000 {
            sum += submit_to(1, move || i).await.unwrap();
        }
        sum
    });
    assert_eq!(sum, 499_500);
    assert!(rt.driver().is_overprovisioned());
}

/// Shard 0 is the thread that built the runtime: pinning it must not outlive
/// the runtime.
#[test]
fn the_building_thread_gets_its_affinity_back() {
    std::thread::spawn(|| {
        let before = core_affinity::get_core_ids().unwrap_or_default().len();
        let rt = Runtime::builder().shards(1).pin(true).build().unwrap();
        if rt.is_pinned() {
            assert_eq!(core_affinity::get_core_ids().unwrap_or_default().len(), 1);
        }
        rt.shutdown();
        assert_eq!(
            core_affinity::get_core_ids().unwrap_or_default().len(),
            before
        );
    })
    .join()
    .unwrap();
}

/// With a cpuset, pinned shard `i` runs on its `i`-th CPU alone; unpinned,
/// every shard stays within the set; and the building thread gets its
/// affinity back after.
#[test]
fn a_cpuset_places_the_shards() {
    fn affinity() -> Vec<usize> {
        core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|core| core.id)
            .collect()
    }
    std::thread::spawn(|| {
        let before = affinity();
        let cpus: Vec<usize> = before.iter().rev().copied().collect();
        let rt = Runtime::builder().cpuset(cpus.clone()).build().unwrap();
        assert_eq!(rt.driver().shard_count(), cpus.len());
        assert_eq!(affinity(), [cpus[0]]);
        if cpus.len() > 1 {
            let on_1 = rt.block_on(async { submit_to_async(1, || async { affinity() }).await });
            assert_eq!(on_1.unwrap(), [cpus[1]]);
        }
        rt.shutdown();
        assert_eq!(affinity(), before);

        let within = vec![before[before.len() - 1]];
        let rt = Runtime::builder()
            .cpuset(within.clone())
            .shards(2)
            .overprovisioned(true)
            .build()
            .unwrap();
        let on_1 = rt.block_on(async { submit_to_async(1, || async { affinity() }).await });
        assert_eq!(on_1.unwrap(), within);
        rt.shutdown();
        assert_eq!(affinity(), before);

        let err = Runtime::builder().cpuset([100_000]).build().err().unwrap();
        assert!(err.to_string().contains("may not run on"), "{err}");
    })
    .join()
    .unwrap();
}

#[test]
fn quiet_only_when_no_call_is_in_flight() {
    let rt = runtime(2);
    assert!(rt.is_quiet());
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = release.clone();
    rt.block_on(async move {
        drop(submit_to_async(1, move || async move {
            while !gate.load(Ordering::SeqCst) {
                sleep(Duration::from_millis(1)).await;
            }
        }));
    });
    // Shard 0 is not turning now: its call stays in flight however long
    // shard 1 takes.
    assert!(!rt.is_quiet());
    release.store(true, Ordering::SeqCst);
    rt.block_on(async {
        while !rt.is_quiet() {
            sleep(Duration::from_millis(1)).await;
        }
    });
    let stats = rt.stats();
    assert!(stats.queues.iter().all(|q| q.sent == q.completed));
    rt.shutdown();
}

#[test]
fn force_stop_ends_the_shards_with_a_call_in_flight() {
    let rt = runtime(2);
    // A call that would never finish, sent and left unawaited.
    #[allow(clippy::async_yields_async)]
    let stuck = rt.block_on(async { submit_to_async(1, std::future::pending::<()>) });
    assert!(!rt.is_quiet());
    let started = Instant::now();
    rt.force_stop();
    rt.shutdown();
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(stuck);
}

#[test]
fn runtimes_are_told_apart() {
    let first = runtime(1);
    let second = runtime(1);
    let a = first.block_on(async { shardloop_core::runtime_id() });
    let b = second.block_on(async { shardloop_core::runtime_id() });
    assert!(a.is_some() && b.is_some() && a != b);
    assert_eq!(shardloop_core::runtime_id(), None);
}

/// Counts its drops in the counter it shares.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn results_small_and_large_come_back_whole() {
    let rt = runtime(2);
    rt.block_on(async {
        let text = submit_to(1, || format!("from shard {}", shard_id().unwrap())).await;
        assert_eq!(text.as_deref(), Ok("from shard 1"));
        let wide = submit_to(1, || [7u64; 8]).await;
        assert_eq!(wide, Ok([7; 8]));
        let later = submit_to_async(1, || async { vec![1u8, 2, 3] }).await;
        assert_eq!(later, Ok(vec![1, 2, 3]));
        let err = submit_to(1, || -> [u64; 8] { panic!("too wide to fail") }).await;
        assert!(err.unwrap_err().to_string().contains("too wide to fail"));
    });
}

#[test]
fn what_a_call_owns_is_dropped_exactly_once() {
    let rt = runtime(2);
    let (funcs, results) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (f, r) = (funcs.clone(), results.clone());
    rt.block_on(async move {
        // A result carried in the reply's slot, and one too big for it.
        let captured = Counted(f.clone());
        let result = Counted(r.clone());
        let small = submit_to(1, move || {
            drop(captured);
            result
        });
        drop(small.await.unwrap());
        let (captured, result) = (Counted(f.clone()), Counted(r.clone()));
        let big = submit_to(1, move || {
            drop(captured);
            (result, [0u64; 4])
        });
        drop(big.await.unwrap());
        // Abandoned before it comes back: the result is dropped on arrival.
        let (captured, result) = (Counted(f.clone()), Counted(r.clone()));
        drop(submit_to(1, move || {
            drop(captured);
            result
        }));
        let (captured, result) = (Counted(f.clone()), Counted(r.clone()));
        let later = submit_to_async(1, move || async move {
            sleep(Duration::from_millis(1)).await;
            drop(captured);
            result
        });
        drop(later.await.unwrap());
    });
    rt.shutdown();
    assert_eq!(funcs.load(Ordering::SeqCst), 4);
    assert_eq!(results.load(Ordering::SeqCst), 4);
}

#[test]
fn a_stopped_shard_drops_what_its_unfinished_calls_own_once() {
    let rt = runtime(2);
    let drops = Arc::new(AtomicUsize::new(0));
    let held = Counted(drops.clone());
    #[allow(clippy::async_yields_async)]
    let stuck = rt.block_on(async move {
        submit_to_async(1, move || async move {
            std::future::pending::<()>().await;
            drop(held);
        })
    });
    rt.force_stop();
    rt.shutdown();
    drop(stuck);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}
