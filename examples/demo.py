"""shardloop at work: one shard per core (or ``--shards N``), where
``invoke_on_all`` runs, what ``submit_to`` returns, the measured round trips
from shard 0 to shard 1, and the queue's counters from ``shardloop.stats()``.

    python examples/demo.py [--shards N]
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import shardloop
from shardloop import shard

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
    queue = next(q for q in shardloop.stats()["queues"] if (q["from"], q["to"]) == (0, target))
    print(
        f"\nqueue 0 -> {target}: sent {queue['sent']:,}, completed {queue['completed']:,}, "
        f"batches {queue['batches']:,}, max depth {queue['max_depth']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shards", type=int, default=None, help="number of shards (default: one per core)"
    )
    args = parser.parse_args()
    shardloop.run(_main(), shards=args.shards)


if __name__ == "__main__":
    main()
