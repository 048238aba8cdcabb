//! Two pinned threads, one pushing and one popping pointer-sized items through
//! a bounded queue of 1,024 slots, in batches of 1, 16 and 64: shardloop's
//! ring against rtrb, crossbeam's ArrayQueue and bounded channel, and std's
//! sync_channel, all in the same run.

use std::hint::{black_box, spin_loop};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const CAPACITY: usize = 1024;
const ITEMS: usize = 100_000;
const BATCHES: [usize; 3] = [1, 16, 64];

/// Pins the calling thread to the `core`-th core of the process (read once,
/// before any thread of the bench is pinned).
fn pin(core: usize) {
    static CORES: std::sync::OnceLock<Vec<core_affinity::CoreId>> = std::sync::OnceLock::new();
    let cores = CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default());
    if let Some(&id) = cores.get(core) {
        core_affinity::set_for_current(id);
    }
}

/// Runs `consume` on core 1 and `produce` on core 0 for `iters * ITEMS` items
/// and returns the time until the consumer has seen the last one. Each side
/// first moves its queue half onto its own stack: left in the closure, which
/// the spawning thread allocates, it can share a cache line with the
/// producer's heap data and the bench then measures false sharing.
fn transfer(
    iters: u64,
    produce: impl FnOnce(usize) + Send,
    consume: impl FnOnce(usize) + Send,
) -> Duration {
    let total = ITEMS * iters as usize;
    thread::scope(|scope| {
        let consumer = scope.spawn(move || {
            pin(1);
            consume(total);
        });
        pin(0);
        let start = Instant::now();
        produce(total);
        consumer.join().unwrap();
        start.elapsed()
    })
}

fn shardloop_ring(iters: u64, batch: usize) -> Duration {
    let (tx, rx) = shardloop_core::ring::channel::<usize>(CAPACITY);
    transfer(
        iters,
        move |total| {
            let mut tx = tx;
            let mut next = 0;
            while next < total {
                let want = batch.min(total - next);
                let pushed = if want == 1 {
                    usize::from(tx.push(next).is_ok())
                } else {
                    tx.push_iter(&mut (next..next + want))
                };
                if pushed == 0 {
                    spin_loop();
                }
                next += pushed;
            }
        },
        move |total| {
            let mut rx = rx;
            let mut seen = 0;
            while seen < total {
                let got = if batch == 1 {
                    rx.pop().map(black_box).map_or(0, |_| 1)
                } else {
                    rx.pop_with(batch, |value| {
                        black_box(value);
                    })
                };
                if got == 0 {
                    spin_loop();
                }
                seen += got;
            }
        },
    )
}

fn rtrb(iters: u64, batch: usize) -> Duration {
    let (tx, rx) = rtrb::RingBuffer::<usize>::new(CAPACITY);
    transfer(
        iters,
        move |total| {
            let mut tx = tx;
            let mut next = 0;
            while next < total {
                let want = batch.min(total - next);
                match tx.write_chunk_uninit(want) {
                    Ok(chunk) => {
                        chunk.fill_from_iter(next..next + want);
                        next += want;
                    }
                    Err(_) => spin_loop(),
                }
            }
        },
        move |total| {
            let mut rx = rx;
            let mut seen = 0;
            while seen < total {
                let ready = rx.slots().min(batch);
                if ready == 0 {
                    spin_loop();
                    continue;
                }
                let chunk = rx.read_chunk(ready).unwrap();
                for value in chunk {
                    black_box(value);
                }
                seen += ready;
            }
        },
    )
}

fn array_queue(iters: u64, batch: usize) -> Duration {
    let queue = crossbeam_queue::ArrayQueue::<usize>::new(CAPACITY);
    let queue = &queue;
    transfer(
        iters,
        move |total| {
            for value in 0..total {
                let mut value = value;
                while let Err(back) = queue.push(value) {
                    value = back;
                    spin_loop();
                }
            }
        },
        move |total| {
            let mut seen = 0;
            while seen < total {
                let mut got = 0;
                while got < batch {
                    match queue.pop() {
                        Some(value) => {
                            black_box(value);
                            got += 1;
                        }
                        None => break,
                    }
                }
                if got == 0 {
                    spin_loop();
                }
                seen += got;
            }
        },
    )
}

/// A bounded channel (crossbeam's or std's: the same calls): the producer
/// sends item by item, the consumer drains up to `batch` ready items and
/// blocks in `recv` when none is.
macro_rules! channel_bench {
    ($name:ident, $channel:expr) => {
        fn $name(iters: u64, batch: usize) -> Duration {
            let (tx, rx) = $channel;
            transfer(
                iters,
                move |total| {
                    for value in 0..total {
                        tx.send(value).unwrap();
                    }
                },
                move |total| {
                    let mut seen = 0;
                    while seen < total {
                        let got = rx.try_iter().take(batch).map(black_box).count();
                        if got == 0 {
                            black_box(rx.recv().unwrap());
                            seen += 1;
                        }
                        seen += got;
                    }
                },
            )
        }
    };
}

channel_bench!(
    crossbeam_channel,
    crossbeam_channel::bounded::<usize>(CAPACITY)
);
channel_bench!(
    std_sync_channel,
    std::sync::mpsc::sync_channel::<usize>(CAPACITY)
);

fn bench(c: &mut Criterion) {
    pin(0);
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(ITEMS as u64));
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(3));
    type Run = fn(u64, usize) -> Duration;
    let queues: [(&str, Run); 5] = [
        ("shardloop", shardloop_ring),
        ("rtrb", rtrb),
        ("crossbeam_ArrayQueue", array_queue),
        ("crossbeam_channel_bounded", crossbeam_channel),
        ("std_sync_channel", std_sync_channel),
    ];
    for batch in BATCHES {
        for (name, run) in queues {
            group.bench_with_input(BenchmarkId::new(name, batch), &batch, |b, &batch| {
                b.iter_custom(|iters| run(iters, batch))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
