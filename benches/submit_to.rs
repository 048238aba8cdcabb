//! Cross-shard calls between shard 0 and shard 1 (pinned to cores 0 and 1):
//! a sequential round trip and 1,024 calls in flight, beside the physical
//! floor (one cache line bouncing between two pinned threads) and a request/
//! response round trip over two crossbeam channels, in the same run.
//!
//! On a VM the host may move the two vCPUs between physical cores during a
//! run, which changes the floor itself (here from about 70 ns to 300 ns). So
//! after criterion's groups the bench measures the floor, the bare ring pair
//! and `submit_to` again in short alternating rounds, and reports each
//! round's round trips as multiples of that round's floor, with their median:
//! a ratio both sides of which saw the same placement.

use std::hint::{black_box, spin_loop};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use crossbeam_utils::CachePadded;
use shardloop_core::{submit_to, Runtime};

const IN_FLIGHT: usize = 1024;

/// The cores of the process, read once before any thread of the bench is
/// pinned (pinning narrows what the pinned thread sees).
fn cores() -> &'static [core_affinity::CoreId] {
    static CORES: std::sync::OnceLock<Vec<core_affinity::CoreId>> = std::sync::OnceLock::new();
    CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default())
}

/// Pins the calling thread to the `core`-th core of the process.
fn pin(core: usize) {
    if let Some(&id) = cores().get(core) {
        core_affinity::set_for_current(id);
    }
}

/// The floor: thread A writes `2i+1`, thread B answers `2i+2`; one iteration
/// is one cache line there and back.
fn ping_pong(iters: u64) -> Duration {
    let line = CachePadded::new(AtomicU64::new(0));
    let line = &line;
    thread::scope(|scope| {
        scope.spawn(move || {
            pin(1);
            for i in 0..iters {
                while line.load(Ordering::Acquire) != 2 * i + 1 {
                    spin_loop();
                }
                line.store(2 * i + 2, Ordering::Release);
            }
        });
        pin(0);
        let start = Instant::now();
        for i in 0..iters {
            line.store(2 * i + 1, Ordering::Release);
            while line.load(Ordering::Acquire) != 2 * i + 2 {
                spin_loop();
            }
        }
        start.elapsed()
    })
}

/// A peer: a request channel and a response channel between two pinned
/// threads, the server looping on recv and send.
fn channel_round_trip(iters: u64) -> Duration {
    let (req_tx, req_rx) = crossbeam_channel::bounded::<u64>(IN_FLIGHT);
    let (resp_tx, resp_rx) = crossbeam_channel::bounded::<u64>(IN_FLIGHT);
    thread::scope(|scope| {
        scope.spawn(move || {
            pin(1);
            for value in req_rx {
                resp_tx.send(value + 1).unwrap();
            }
        });
        pin(0);
        let start = Instant::now();
        for i in 0..iters {
            req_tx.send(i).unwrap();
            black_box(resp_rx.recv().unwrap());
        }
        let elapsed = start.elapsed();
        drop(req_tx);
        elapsed
    })
}

/// The transport alone: a boxed item sent over a shardloop request ring and
/// back over a response ring between two pinned threads, no runtime around
/// it. Against the ping-pong it shows what the ring design costs; against
/// `submit_to` what the runtime adds.
fn ring_pair_round_trip(iters: u64) -> Duration {
    use shardloop_core::ring::channel;
    use std::collections::VecDeque;
    let (mut req_tx, mut req_rx) = channel::<Box<[u64; 4]>>(IN_FLIGHT);
    let (mut resp_tx, mut resp_rx) = channel::<Box<[u64; 4]>>(IN_FLIGHT);
    thread::scope(|scope| {
        scope.spawn(move || {
            pin(1);
            let (mut batch, mut replies) = (Vec::new(), VecDeque::new());
            let mut served = 0;
            while served < iters {
                if req_rx.pop_into(&mut batch, usize::MAX) == 0 {
                    spin_loop();
                    continue;
                }
                for mut item in batch.drain(..) {
                    item[1] = item[0] + 1;
                    replies.push_back(item);
                    served += 1;
                }
                while !replies.is_empty() {
                    resp_tx.push_from(&mut replies);
                }
            }
        });
        let (mut request, mut reply) = (VecDeque::new(), Vec::new());
        let start = Instant::now();
        for i in 0..iters {
            request.push_back(Box::new([i, 0, 0, 0]));
            req_tx.push_from(&mut request);
            while resp_rx.pop_into(&mut reply, 1) == 0 {
                spin_loop();
            }
            black_box(reply.pop());
        }
        start.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    assert!(cores().len() >= 2, "the bench needs two cores");
    // Shard 0 is this thread, pinned to core 0 by the runtime.
    let runtime = Runtime::builder().shards(2).pin(true).build().unwrap();
    assert!(runtime.is_pinned());

    let mut group = c.benchmark_group("round_trip");
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(3));
    group.bench_function("cache_line_ping_pong", |b| b.iter_custom(ping_pong));
    group.bench_function("ring_pair", |b| b.iter_custom(ring_pair_round_trip));
    group.bench_function("crossbeam_channel_pair", |b| {
        b.iter_custom(channel_round_trip)
    });
    group.bench_function("shardloop_submit_to", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async move {
                let start = Instant::now();
                for i in 0..iters {
                    black_box(submit_to(1, move || i + 1).await.unwrap());
                }
                start.elapsed()
            })
        })
    });
    group.finish();

    let mut group = c.benchmark_group("in_flight_1024");
    group.throughput(Throughput::Elements(IN_FLIGHT as u64));
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(3));
    group.bench_function("shardloop_submit_to", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async move {
                let mut calls = Vec::with_capacity(IN_FLIGHT);
                let start = Instant::now();
                for _ in 0..iters {
                    calls.extend((0..IN_FLIGHT as u64).map(|i| submit_to(1, move || i + 1)));
                    for call in calls.drain(..) {
                        black_box(call.await.unwrap());
                    }
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

/// Round trips per alternating round of the ratio measurement.
const ROUND: u64 = 20_000;
const ROUNDS: usize = 31;

/// The median of `values`.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The sequential round trips as multiples of the floor measured in the
/// same round (see the module's note).
fn ratios_to_the_floor() {
    let runtime = Runtime::builder().shards(2).pin(true).build().unwrap();
    let submit = |iters: u64| {
        runtime.block_on(async move {
            let start = Instant::now();
            for i in 0..iters {
                black_box(submit_to(1, move || i + 1).await.unwrap());
            }
            start.elapsed()
        })
    };
    let per_trip = |elapsed: Duration| elapsed.as_secs_f64() * 1e9 / ROUND as f64;
    submit(ROUND);
    let (mut floor, mut ring, mut call) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ring_ratio, mut call_ratio) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let f = per_trip(ping_pong(ROUND));
        let r = per_trip(ring_pair_round_trip(ROUND));
        let c = per_trip(submit(ROUND));
        floor.push(f);
        ring.push(r);
        call.push(c);
        ring_ratio.push(r / f);
        call_ratio.push(c / f);
    }
    println!("\nalternating rounds of {ROUND} sequential round trips, medians of {ROUNDS} rounds:");
    println!(
        "  cache-line ping-pong (floor)  {:7.1} ns",
        median(&mut floor)
    );
    println!(
        "  ring pair, bare               {:7.1} ns   {:.2}x the floor of its round",
        median(&mut ring),
        median(&mut ring_ratio)
    );
    println!(
        "  submit_to                     {:7.1} ns   {:.2}x the floor of its round",
        median(&mut call),
        median(&mut call_ratio)
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    if std::env::args().any(|arg| arg == "--bench") {
        ratios_to_the_floor();
    }
}
