"""A sharded store speaking the memcached text protocol.

Each key lives on shard ``crc32(key) % shards``: a command for a key the
accepting shard owns is served in place, any other goes to the owner with
``submit_to`` (as in Seastar's apps/memcached). Connections are
``shardloop.Connection``s: commands are read from Rust's buffer. Supported: get, gets, set,
add, replace, append, prepend, cas, delete, incr, decr, touch, flush_all,
version, stats, verbosity, quit, with ``noreply`` and expiry times.

    python examples/memcached_server.py --port 11211 [--shards N]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
import zlib
from dataclasses import dataclass

import shardloop
from shardloop import shard

VERSION = "1.6.0-shardloop"
MAX_KEY = 250
MAX_VALUE = 1024 * 1024
MAX_LINE = 2048
THIRTY_DAYS = 60 * 60 * 24 * 30
U64 = 2**64


@dataclass
class Item:
    value: bytes
    flags: int
    expires: float  # 0: never
    cas: int


class Store:
    """One shard's part of the data. Only its own shard touches it."""

    def __init__(self) -> None:
        self.items: dict[bytes, Item] = {}
        self.cas_ids = itertools.count(1 + shard.id() * (1 << 48))
        self.flushed_at = 0.0
        self.flush_cas = 0
        self.counts = {"get_hits": 0, "get_misses": 0, "cmd_get": 0, "cmd_set": 0}

    def _live(self, key: bytes) -> Item | None:
        item = self.items.get(key)
        if item is None:
            return None
        now = time.time()
        if (item.expires and item.expires <= now) or (
            self.flushed_at and self.flushed_at <= now and item.cas <= self.flush_cas
        ):
            del self.items[key]
            return None
        return item

    def get(self, keys: list[bytes]) -> list[tuple[bytes, int, bytes, int]]:
        found = []
        for key in keys:
            self.counts["cmd_get"] += 1
            item = self._live(key)
            if item is None:
                self.counts["get_misses"] += 1
            else:
                self.counts["get_hits"] += 1
                found.append((key, item.flags, item.value, item.cas))
        return found

    def get_one(self, key: bytes) -> bytes:
        """The whole reply to ``get key``."""
        self.counts["cmd_get"] += 1
        item = self._live(key)
        if item is None:
            self.counts["get_misses"] += 1
            return b"END\r\n"
        self.counts["get_hits"] += 1
        return b"VALUE %s %d %d\r\n%s\r\nEND\r\n" % (key, item.flags, len(item.value), item.value)

    def store(
        self, key: bytes, cmd: str, flags: int, expires: float, value: bytes, cas: int
    ) -> bytes:
        self.counts["cmd_set"] += 1
        item = self._live(key)
        if cmd == "add" and item is not None:
            return b"NOT_STORED"
        if cmd in ("replace", "append", "prepend") and item is None:
            return b"NOT_STORED"
        if cmd == "cas":
            if item is None:
                return b"NOT_FOUND"
            if item.cas != cas:
                return b"EXISTS"
        if cmd == "append" and item is not None:
            value, flags, expires = item.value + value, item.flags, item.expires
        elif cmd == "prepend" and item is not None:
            value, flags, expires = value + item.value, item.flags, item.expires
        if expires < 0:
            self.items.pop(key, None)
            return b"STORED"
        self.items[key] = Item(value, flags, expires, next(self.cas_ids))
        return b"STORED"

    def delete(self, key: bytes) -> bytes:
        if self._live(key) is None:
            return b"NOT_FOUND"
        del self.items[key]
        return b"DELETED"

    def arith(self, key: bytes, delta: int, incr: bool) -> bytes:
        item = self._live(key)
        if item is None:
            return b"NOT_FOUND"
        if not item.value.isdigit() or len(item.value) > 20 or int(item.value) >= U64:
            return b"CLIENT_ERROR cannot increment or decrement non-numeric value"
        current = int(item.value)
        result = (current + delta) % U64 if incr else max(0, current - delta)
        item.value = str(result).encode()
        item.cas = next(self.cas_ids)
        return item.value

    def touch(self, key: bytes, expires: float) -> bytes:
        item = self._live(key)
        if item is None:
            return b"NOT_FOUND"
        item.expires = expires
        return b"TOUCHED"

    def flush(self, at: float) -> bytes:
        if at <= time.time():
            self.items.clear()
        else:
            self.flushed_at = at
            self.flush_cas = next(self.cas_ids)
        return b"OK"


_stores: dict[int, Store] = {}


def local() -> Store:
    return _stores[shard.id()]


def make_store() -> None:
    _stores[shard.id()] = Store()


def owner(key: bytes) -> int:
    count = shard.count()
    return zlib.crc32(key) % count if count > 1 else 0


def expiry(exptime: int) -> float:
    """memcached's rule: 0 never, up to 30 days relative, beyond that a unix
    time; negative: already expired."""
    if exptime == 0:
        return 0.0
    if exptime < 0:
        return -1.0
    if exptime > THIRTY_DAYS:
        return float(exptime) if exptime > time.time() else -1.0
    return time.time() + exptime


async def on_owner(key: bytes, method: str, *args: object) -> object:
    """Runs a Store method on the shard that owns ``key``."""
    target = owner(key)
    if target == shard.id():
        return getattr(local(), method)(key, *args)
    return await shard.submit_to(target, _call_store, method, key, *args)


def _call_store(method: str, key: bytes, *args: object) -> object:
    return getattr(local(), method)(key, *args)


def _get_many(keys: list[bytes]) -> list[tuple[bytes, int, bytes, int]]:
    return local().get(keys)


class ClientError(Exception):
    pass


async def get(keys: list[bytes], with_cas: bool) -> bytes:
    by_owner: dict[int, list[bytes]] = {}
    for key in keys:
        if len(key) > MAX_KEY:
            raise ClientError("bad command line format")
        by_owner.setdefault(owner(key), []).append(key)
    found: dict[bytes, tuple[bytes, int, bytes, int]] = {}
    for target, group in by_owner.items():
        rows = (
            local().get(group)
            if target == shard.id()
            else await shard.submit_to(target, _get_many, group)
        )
        found.update((row[0], row) for row in rows)
    out = []
    for key in keys:
        row = found.get(key)
        if row is None:
            continue
        _, flags, value, cas = row
        head = b"VALUE %s %d %d" % (key, flags, len(value))
        out.append(head + (b" %d" % cas if with_cas else b"") + b"\r\n" + value + b"\r\n")
    return b"".join(out) + b"END\r\n"


def parse_int(token: bytes, *, unsigned: bool = True) -> int:
    if not token.lstrip(b"-").isdigit() or (unsigned and token.startswith(b"-")):
        raise ClientError("bad command line format")
    return int(token)


async def stats() -> bytes:
    per_shard = await shard.invoke_on_all(_shard_stats)
    total = {k: sum(s[k] for s in per_shard) for k in per_shard[0]}
    lines = [
        (b"pid", b"%d" % __import__("os").getpid()),
        (b"uptime", b"%d" % int(time.time() - STARTED)),
        (b"time", b"%d" % int(time.time())),
        (b"version", VERSION.encode()),
        (b"threads", b"%d" % shard.count()),
    ] + [(k.encode(), b"%d" % v) for k, v in total.items()]
    return b"".join(b"STAT %s %s\r\n" % pair for pair in lines) + b"END\r\n"


def _shard_stats() -> dict[str, int]:
    store = local()
    return {**store.counts, "curr_items": len(store.items)}


STARTED = time.time()


async def handle(conn: shardloop.Connection) -> None:
    me, store = shard.id(), local()
    while True:
        try:
            line = await conn.read_until(b"\n", limit=MAX_LINE)
        except asyncio.IncompleteReadError:
            return
        except asyncio.LimitOverrunError:
            conn.write(b"CLIENT_ERROR line too long\r\n")
            await conn.drain()
            return
        tokens = line.split()
        if not tokens:
            conn.write(b"ERROR\r\n")
            continue
        if (
            len(tokens) == 2
            and tokens[0] == b"get"
            and len(tokens[1]) <= MAX_KEY
            and owner(tokens[1]) == me
        ):
            # The most common command, for a key of this shard: served in place.
            reply: bytes | None = store.get_one(tokens[1])
        else:
            try:
                reply = await command(tokens, conn)
            except ClientError as error:
                reply = b"CLIENT_ERROR %s\r\n" % str(error).encode()
        if reply is None:  # quit
            return
        if reply:
            conn.write(reply)
            await conn.drain()


STORAGE = {b"set", b"add", b"replace", b"append", b"prepend", b"cas"}


async def command(tokens: list[bytes], conn: shardloop.Connection) -> bytes | None:
    name = tokens[0]
    if name in STORAGE:
        cas_form = name == b"cas"
        wanted = 6 if cas_form else 5
        if len(tokens) not in (wanted, wanted + 1):
            return b"ERROR\r\n"
        key = tokens[1]
        try:
            flags = parse_int(tokens[2])
            exptime = parse_int(tokens[3], unsigned=False)
            size = parse_int(tokens[4])
            cas = parse_int(tokens[5]) if cas_form else 0
        except ClientError:
            return b"CLIENT_ERROR bad command line format\r\n"
        noreply = len(tokens) == wanted + 1 and tokens[-1] == b"noreply"
        if len(tokens) == wanted + 1 and not noreply:
            return b"ERROR\r\n"
        if size > MAX_VALUE or len(key) > MAX_KEY or flags >= 2**32:
            await discard(conn, size + 2)
            if size > MAX_VALUE:
                return b"SERVER_ERROR object too large for cache\r\n"
            return b"CLIENT_ERROR bad command line format\r\n"
        data = await conn.read_exactly(size + 2)
        if data[-2:] != b"\r\n":
            return b"CLIENT_ERROR bad data chunk\r\n"
        result = await on_owner(key, "store", name.decode(), flags, expiry(exptime), data[:-2], cas)
        return b"" if noreply else bytes(result) + b"\r\n"  # type: ignore[arg-type]
    if name in (b"get", b"gets"):
        if len(tokens) < 2:
            return b"ERROR\r\n"
        return await get(tokens[1:], with_cas=name == b"gets")
    if name == b"delete":
        if len(tokens) not in (2, 3) or (len(tokens) == 3 and tokens[2] != b"noreply"):
            return b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
        result = await on_owner(tokens[1], "delete")
        return b"" if len(tokens) == 3 else bytes(result) + b"\r\n"  # type: ignore[arg-type]
    if name in (b"incr", b"decr"):
        if len(tokens) not in (3, 4):
            return b"ERROR\r\n"
        if not tokens[2].isdigit() or int(tokens[2]) >= U64:
            return b"CLIENT_ERROR invalid numeric delta argument\r\n"
        result = await on_owner(tokens[1], "arith", int(tokens[2]), name == b"incr")
        return b"" if len(tokens) == 4 else bytes(result) + b"\r\n"  # type: ignore[arg-type]
    if name == b"touch":
        if len(tokens) not in (3, 4):
            return b"ERROR\r\n"
        result = await on_owner(tokens[1], "touch", expiry(parse_int(tokens[2], unsigned=False)))
        return b"" if len(tokens) == 4 else bytes(result) + b"\r\n"  # type: ignore[arg-type]
    if name == b"flush_all":
        args = [t for t in tokens[1:] if t != b"noreply"]
        delay = parse_int(args[0]) if args else 0
        at = time.time() + delay if delay else 0.0
        await shard.invoke_on_all(_flush, at)
        return b"" if tokens[-1] == b"noreply" else b"OK\r\n"
    if name == b"version":
        return b"VERSION %s\r\n" % VERSION.encode()  # extra words are ignored, as by memcached
    if name == b"stats":
        return await stats() if len(tokens) == 1 else b"ERROR\r\n"
    if name == b"verbosity":
        if tokens[-1] == b"noreply":
            return b""
        return b"OK\r\n" if len(tokens) == 2 and tokens[1].isdigit() else b"ERROR\r\n"
    if name == b"quit":
        return None
    return b"ERROR\r\n"


async def discard(conn: shardloop.Connection, size: int) -> None:
    """Reads and drops the data block of a refused command."""
    while size > 0:
        chunk = await conn.read(min(size, 65536))
        if not chunk:
            return
        size -= len(chunk)


def _flush(at: float) -> bytes:
    return local().flush(at)


async def start(host: str, port: int) -> shardloop.ShardedServer:
    await shard.invoke_on_all(make_store)
    return await shardloop.serve_connections(handle, host, port)


async def main(args: argparse.Namespace) -> None:
    server = await start(args.host, args.port)
    print(f"memcached protocol on {args.host}:{server.port}, {shard.count()} shards", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11211)
    parser.add_argument("--shards", type=int, default=None, help="default: one per core")
    arguments = parser.parse_args()
    try:
        shardloop.run(main(arguments), shards=arguments.shards)
    except KeyboardInterrupt:
        pass
