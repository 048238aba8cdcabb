"""The lookup server: a client sends a 4-byte id (big-endian); the shard that
accepted the connection asks the shard that owns the id (``id % shards``)
for its value with ``submit_to`` and writes it back as a 4-byte length and
the bytes. Each shard owns its slice of the data; nothing is shared.

    python examples/lookup_server.py --port 7000            # serve until Ctrl-C
    python examples/lookup_server.py --demo --seconds 5     # serve, load, report

The demo drives the server with the load generator of this repository
(``tools/loadgen.py``, which builds and runs the ``shardloop-load`` binary).
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import shardloop
from shardloop import shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import loadgen  # tools/, put on the path above

KEYS = 100_000


class Slice:
    """One shard's slice of the data (the ids it owns) and its counters."""

    def __init__(self, keys: int) -> None:
        self.me, self.count = shard.id(), shard.count()
        self.table = {key: f"value-{key:08d}".encode() for key in range(self.me, keys, self.count)}
        self.counts = {"requests": 0, "local": 0, "cross_shard": 0}

    def local(self, key: int) -> bytes | None:
        """Counts a request for `key`; its value if this shard owns it, None
        if shard ``key % count`` does (ask it with ``submit_to``)."""
        self.counts["requests"] += 1
        if key % self.count == self.me:
            self.counts["local"] += 1
            return self.table.get(key, b"")
        self.counts["cross_shard"] += 1
        return None


# Every shard fills its own entry (a shard's thread only touches its own).
_slices: dict[int, Slice] = {}


def load_slice(keys: int) -> int:
    """Builds this shard's slice."""
    mine = _slices[shard.id()] = Slice(keys)
    return len(mine.table)


def lookup(key: int) -> bytes:
    return _slices[shard.id()].table.get(key, b"")


def lookup_many(keys: list[int]) -> list[bytes]:
    table = _slices[shard.id()].table
    return [table.get(key, b"") for key in keys]


def counters() -> dict[str, int]:
    return {"shard": shard.id(), **_slices[shard.id()].counts}


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    mine = _slices[shard.id()]
    pack = struct.Struct("!I").pack
    while True:
        try:
            request = await reader.readexactly(4)
        except asyncio.IncompleteReadError:
            return  # the client closed (maybe mid-request)
        (key,) = struct.unpack("!I", request)
        value = mine.local(key)
        if value is None:
            value = await shard.submit_to(key % mine.count, lookup, key)
        writer.write(pack(len(value)) + value)
        await writer.drain()


async def handle_connection(conn: shardloop.Connection) -> None:
    """The same server on a :class:`shardloop.Connection`. It takes every
    whole request already buffered (a client may send several before it
    reads), answers this shard's ids in place, asks each other owner once
    for all of its ids, and writes the answers in request order."""
    mine = _slices[shard.id()]
    me, count, table = mine.me, mine.count, mine.table
    pack = struct.Struct("!I").pack
    unpack = struct.Struct("!I").unpack
    partial = b""  # the start of a request cut by the end of a read
    while True:
        data = await conn.read()
        if not data:
            return  # the client closed (maybe mid-request)
        if partial:
            data = partial + data
        whole = len(data) - len(data) % 4
        partial = data[whole:]
        if whole == 4:  # one request, as a client that waits for each answer sends
            (key,) = unpack(data[:4])
            value = mine.local(key)
            if value is None:
                value = await shard.submit_to(key % count, lookup, key)
            conn.write(pack(len(value)) + value)
            await conn.drain()
            continue
        keys = struct.unpack(f"!{whole // 4}I", data[:whole])
        values: list[bytes] = [b""] * len(keys)
        remote: dict[int, list[int]] = {}  # owner -> indexes of its keys
        for i, key in enumerate(keys):
            owner = key % count
            if owner == me:
                values[i] = table.get(key, b"")
            else:
                remote.setdefault(owner, []).append(i)
        # Every owner is asked at once; then the answers are collected.
        asked = [
            (indexes, shard.submit_to(owner, lookup_many, [keys[i] for i in indexes]))
            for owner, indexes in remote.items()
        ]
        for indexes, answer in asked:
            for i, value in zip(indexes, await answer, strict=True):
                values[i] = value
        mine.counts["requests"] += len(keys)
        mine.counts["cross_shard"] += len(asked)
        mine.counts["local"] += len(keys) - sum(len(indexes) for indexes, _ in asked)
        conn.write(b"".join(pack(len(value)) + value for value in values))
        await conn.drain()


async def start(
    host: str, port: int, keys: int, balance: str, api: str = "connection"
) -> shardloop.ShardedServer:
    await shard.invoke_on_all(load_slice, keys)
    if api == "streams":
        return await shardloop.serve(handle, host, port, balance=balance)  # type: ignore[arg-type]
    return await shardloop.serve_connections(handle_connection, host, port, balance=balance)  # type: ignore[arg-type]


async def serve_until_interrupted(args: argparse.Namespace) -> None:
    server = await start(args.host, args.port, args.keys, args.balance, args.api)
    print(f"lookup server on {args.host}:{server.port}, {shard.count()} shards", flush=True)
    async with server:
        await server.serve_forever()


async def demo(args: argparse.Namespace) -> None:
    """Serves, drives the server with the load generator, and reports."""
    server = await start(args.host, 0, args.keys, args.balance, args.api)
    print(
        f"lookup server on {args.host}:{server.port}, {shard.count()} shards; load for "
        f"{args.seconds:g}s with {args.connections} connections",
        flush=True,
    )
    command = loadgen.command(
        args.host,
        server.port,
        "lookup",
        connections=args.connections,
        seconds=args.seconds,
        keys=args.keys,
    )
    load = await asyncio.create_subprocess_exec(*command)
    await load.wait()
    per_shard = await shard.invoke_on_all(counters)
    connections = {s["shard"]: s["connections"] for s in await server.stats()}
    runtime = {s["shard"]: s for s in shardloop.stats()["shards"]}
    print("per shard:")
    for c in per_shard:
        print(
            f"  shard {c['shard']}: {connections[c['shard']]} connections, "
            f"{c['requests']:,} requests, {c['cross_shard']:,} cross-shard calls; "
            f"left its core to other threads {runtime[c['shard']]['preempted']:,} times"
        )
    await server.close()
    if load.returncode:
        raise SystemExit(f"the load generator failed ({load.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7000)
    parser.add_argument("--shards", type=int, default=None, help="default: one per core")
    parser.add_argument("--keys", type=int, default=KEYS)
    parser.add_argument("--balance", choices=("reuseport", "round_robin"), default="reuseport")
    parser.add_argument(
        "--api",
        choices=("connection", "streams"),
        default="connection",
        help="shardloop.Connection (buffers in Rust) or asyncio streams",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="serve, run the load generator, report (overprovisioned: the load shares the cores)",
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--idle-poll",
        type=float,
        default=200e-6,
        help="seconds an idle shard polls before it sleeps (0: sleep at once)",
    )
    args = parser.parse_args()
    job: Callable[[argparse.Namespace], Awaitable[None]] = (
        demo if args.demo else serve_until_interrupted
    )
    if args.demo:
        loadgen.binary()  # built (if it is not yet) before the shards start
    try:
        # The demo's load generator shares the machine's cores with the shards.
        overprovisioned = True if args.demo else None
        shardloop.run(
            job(args), shards=args.shards, idle_poll=args.idle_poll, overprovisioned=overprovisioned
        )
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
