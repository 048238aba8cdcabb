"""``python -m shardloop demo``: one shard per core, ``submit_to`` and
``invoke_on_all`` at work, and the measured round trips."""

from __future__ import annotations

import asyncio
import threading
import time

from . import run, shard, stats

CALLS = 20_000


def where_am_i() -> tuple[int, str]:
    return shard.id(), threading.current_thread().name


def square(x: int) -> int:
    return x * x


async def slow_square(x: int) -> int:
    await asyncio.sleep(0.001)
    return x * x


async def _main() -> None:
    count = shard.count()
    print(f"shardloop demo: {count} shards, this is shard {shard.id()}")
    print("\ninvoke_on_all(where_am_i):")
    for shard_id, thread in await shard.invoke_on_all(where_am_i):
        print(f"  shard {shard_id} runs on thread {thread!r}")
    if count < 2:
        print("\n(one shard only: calls run inline; start more shards to see them cross cores)")
        return
    target = 1
    print(f"\nsubmit_to({target}, square, 12)       -> {await shard.submit_to(target, square, 12)}")
    print(
        f"submit_to({target}, slow_square, 12)  -> {await shard.submit_to(target, slow_square, 12)}"
    )

    start = time.perf_counter()
    for i in range(CALLS):
        await shard.submit_to(target, square, i)
    sequential = CALLS / (time.perf_counter() - start)

    start = time.perf_counter()
    for _ in range(CALLS // 1000):
        await asyncio.gather(*[shard.submit_to(target, square, i) for i in range(1000)])
    in_flight = CALLS / (time.perf_counter() - start)

    print(f"\nround trips shard 0 -> shard {target} (plain function):")
    print(f"  one at a time:    {sequential:>12,.0f} calls/s  ({1e6 / sequential:.1f} us each)")
    print(f"  1,000 in flight:  {in_flight:>12,.0f} calls/s")
    queue = next(q for q in stats()["queues"] if (q["from"], q["to"]) == (0, target))
    print(
        f"\nqueue 0 -> {target}: sent {queue['sent']:,}, completed {queue['completed']:,}, "
        f"batches {queue['batches']:,}, max depth {queue['max_depth']}"
    )


def main(shards: int | None) -> None:
    run(_main(), shards=shards)
