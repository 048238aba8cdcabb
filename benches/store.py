"""An in-process sharded store: every worker runs its own closed loop of
get/put operations (9 gets to 1 put) on keys spread over all partitions by
hash, each operation doing a few microseconds of Python. No network, no
outside client: what it measures is how the work of N cores is shared.

    python benches/store.py [--seconds 2] [--json]

Three ways to write it, each on 1 and 2 workers, in one run:

- shardloop: one shard per worker owns the partition of its keys; an
  operation on a key another shard owns is a ``submit_to`` to the owner.
- threads + locks: one thread per worker and one lock per partition (how a
  Python user writes it on a free-threaded CPython).
- asyncio + call_soon_threadsafe: one event loop per worker on its own
  thread, owning its partition; an operation on another loop's key goes
  there with ``call_soon_threadsafe`` and its answer comes back the same way.

Each worker keeps CONCURRENCY operations in flight (one coroutine each; the
threads peer runs one at a time per thread, as threads do).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import shardloop
from shardloop import Sharded, shard

KEYS = 4096
CONCURRENCY = 32
PUT_EVERY = 10


def owner_of(key: int, partitions: int) -> int:
    return (key * 2654435761 >> 7) % partitions


class Partition:
    """One partition of the store: a dict, and the Python an operation on
    it costs (a record built, formatted and checked: a few microseconds)."""

    def __init__(self) -> None:
        self.data: dict[int, dict[str, Any]] = {}

    def op(self, key: int, put: bool) -> int:
        if put:
            tags = [(key * i) % 97 for i in range(24)]
            record = {"key": key, "label": f"item-{key:06d}", "tags": tags}
            self.data[key] = record
            return len(record["label"])
        record = self.data.get(key)
        if record is None:
            return 0
        label = record["label"]
        score = sum(t * t for t in record["tags"] if t % 2)
        return len(label.upper()) + score % 1000 + (1 if label.endswith(str(key % 10)) else 0)


def key_stream(seed: int) -> Callable[[], tuple[int, bool]]:
    """Keys and put flags of one worker's closed loop (a cheap LCG)."""
    state = [seed * 7919 + 1, 0]

    def nxt() -> tuple[int, bool]:
        state[0] = (state[0] * 1103515245 + 12345) & 0x7FFFFFFF
        state[1] += 1
        return state[0] % KEYS, state[1] % PUT_EVERY == 0

    return nxt


async def closed_loops(
    me: int,
    workers: int,
    seconds: float,
    local: Callable[[int, bool], object],
    remote: Callable[[int, int, bool], Awaitable[object]],
) -> int:
    """CONCURRENCY closed loops of one worker for `seconds`: an operation on
    a key this worker owns is `local(key, put)`, one another worker owns is
    awaited as `remote(owner, key, put)`. Returns how many ran."""
    done = 0
    stop = time.perf_counter() + seconds

    async def one(seed: int) -> None:
        nonlocal done
        nxt = key_stream(seed)
        while time.perf_counter() < stop:
            for _ in range(16):
                key, put = nxt()
                owner = owner_of(key, workers)
                if owner == me:
                    local(key, put)
                else:
                    await remote(owner, key, put)
                done += 1
            await asyncio.sleep(0)

    await asyncio.gather(*(one(me * 1000 + i) for i in range(CONCURRENCY)))
    return done


# --- shardloop ---------------------------------------------------------------

# One Partition per shard, each built and used on its own shard.
STORE: Sharded[Partition] = Sharded(Partition)


def local_op(key: int, put: bool) -> int:
    return STORE.local().op(key, put)


async def shard_worker(seconds: float) -> int:
    return await closed_loops(
        shard.id(),
        shard.count(),
        seconds,
        local_op,
        lambda owner, key, put: shard.submit_to(owner, local_op, key, put),
    )


def run_shardloop(workers: int, seconds: float) -> float:
    async def main() -> int:
        await STORE.start()
        try:
            counts = await shard.invoke_on_all(shard_worker, seconds)
        finally:
            await STORE.stop()
        return sum(counts)

    return shardloop.run(main(), shards=workers) / seconds


def on_threads(target: Callable[[int], None], workers: int, start: threading.Barrier) -> None:
    """Runs `target(i)` for each worker on a thread of its own, lets them
    all pass `start` together, and waits for them."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join()


# --- threads and a lock per partition ---------------------------------------


def run_threads(workers: int, seconds: float) -> float:
    partitions = [Partition() for _ in range(workers)]
    locks = [threading.Lock() for _ in range(workers)]
    counts = [0] * workers
    start = threading.Barrier(workers + 1)

    def worker(index: int) -> None:
        nxt = key_stream(index * 1000)
        done = 0
        start.wait()
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            for _ in range(16):
                key, put = nxt()
                owner = owner_of(key, workers)
                with locks[owner]:
                    partitions[owner].op(key, put)
                done += 1
        counts[index] = done

    on_threads(worker, workers, start)
    return sum(counts) / seconds


# --- asyncio loops calling each other -----------------------------------------


def run_asyncio_loops(workers: int, seconds: float) -> float:
    loops: list[asyncio.AbstractEventLoop] = []
    partitions = [Partition() for _ in range(workers)]
    counts = [0] * workers
    ready = threading.Barrier(workers + 1)

    def remote(owner: int, key: int, put: bool, caller: asyncio.AbstractEventLoop) -> Any:
        future = caller.create_future()

        def serve() -> None:
            result = partitions[owner].op(key, put)
            caller.call_soon_threadsafe(future.set_result, result)

        loops[owner].call_soon_threadsafe(serve)
        return future

    async def worker(index: int) -> None:
        loop = asyncio.get_running_loop()
        done = await closed_loops(
            index,
            workers,
            seconds,
            partitions[index].op,
            lambda owner, key, put: remote(owner, key, put, loop),
        )
        counts[index] = done
        # Keep serving the others until they are done too.
        await asyncio.sleep(0.2)

    def thread(index: int) -> None:
        loop = asyncio.new_event_loop()
        loops[index] = loop
        ready.wait()
        loop.run_until_complete(worker(index))
        loop.close()

    loops.extend([None] * workers)  # type: ignore[list-item]
    on_threads(thread, workers, ready)
    return sum(counts) / seconds


PEERS: dict[str, Callable[[int, float], float]] = {
    "shardloop": run_shardloop,
    "threads + lock per partition": run_threads,
    "asyncio loops + call_soon_threadsafe": run_asyncio_loops,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", action="store_true", help="print a machine-readable summary")
    args = parser.parse_args()
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    results: dict[str, dict[str, float]] = {}
    for name, run in PEERS.items():
        results[name] = {f"{n} workers": run(n, args.seconds) for n in (1, 2)}
    summary = {"python": sys.version.split()[0], "gil": gil, "ops_per_second": results}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    state = "on" if gil else "off"
    print(f"Python {summary['python']}, GIL {state}: ops/s ({args.seconds:g}s each)")
    for name, rates in results.items():
        one, two = rates["1 workers"], rates["2 workers"]
        print(f"  {name:38} 1: {one:>10,.0f}  2: {two:>10,.0f}  2/1: {two / one:.2f}x")
    ours = results["shardloop"]["2 workers"]
    for name in list(PEERS)[1:]:
        print(f"  shardloop on 2 / {name} on 2: {ours / results[name]['2 workers']:.2f}x")


if __name__ == "__main__":
    main()
