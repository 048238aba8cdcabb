"""Sending work to shards from code that is not a shard: a thread pool
(as a WSGI server or a plain executor runs handlers) and an asyncio app on
its own loop, both calling into one background runtime.

    python examples/from_threads.py [--shards N] [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import zlib
from concurrent.futures import ThreadPoolExecutor

import shardloop
from shardloop import Sharded, shard


class Store:
    """One partition of a key-value store per shard."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def put(self, key: str, value: str) -> int:
        self.data[key] = value
        return shard.id()

    def get(self, key: str) -> str | None:
        return self.data.get(key)


STORE: Sharded[Store] = Sharded(Store)


def owner(key: str, shards: int) -> int:
    return zlib.crc32(key.encode()) % shards


async def start_store() -> None:
    await STORE.start()


def put(key: str, value: str) -> int:
    return STORE.local().put(key, value)


def get(key: str) -> str | None:
    return STORE.local().get(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()

    with shardloop.start(shards=args.shards, pin=False) as rt:
        rt.submit_to(0, start_store).result()
        n = rt.shard_count

        # A thread pool's handlers: each blocks on its own call.
        def handle(i: int) -> int:
            key = f"user:{i}"
            return rt.submit_to(owner(key, n), put, key, f"name-{i}").result()

        with ThreadPoolExecutor(8) as pool:
            placed = list(pool.map(handle, range(args.requests)))
        per_shard = [placed.count(i) for i in range(n)]
        print(f"thread pool: {args.requests} puts, per shard {per_shard}")

        # An asyncio app on its own loop: awaits the shards' answers.
        async def app() -> list[str | None]:
            keys = [f"user:{i}" for i in range(0, args.requests, max(1, args.requests // 5))]
            return list(await asyncio.gather(*(rt.call(owner(k, n), get, k) for k in keys)))

        print(f"asyncio app on its own loop read back: {asyncio.run(app())}")


if __name__ == "__main__":
    main()
