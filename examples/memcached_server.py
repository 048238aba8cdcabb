"""A sharded store speaking the memcached text protocol.

Each key lives on shard ``crc32(key) % shards``: a command for a key the
accepting shard owns is served in place, any other goes to the owner with
``submit_to`` (as in Seastar's apps/memcached). Connections are
``shardloop.Connection``s: commands are read from Rust's buffer. Supported:
get, gets, gat, gats, set, add, replace, append, prepend, cas, delete, incr,
decr, touch, flush_all, version, stats, verbosity, quit, with ``noreply`` and
expiry times; every reply, error replies included, is memcached 1.6's
(tests/test_memcached_diff.py compares them with the real memcached's). Not
here: the meta commands (mg, ms, ...) and memcached's administrative ones
(stats subcommands other than reset, slabs, lru, watch, ...): ERROR.

Memory is bounded as memcached's ``-m`` bounds it: the limit is split between
the shards, and each evicts its least recently used items to stay under its
part. A value still being received holds its room on the accepting shard, so
clients stalled half-way through large values cannot add memory beyond the
limit: when no room can be had, the value is refused ("SERVER_ERROR out of
memory storing object") and its bytes are read and dropped, as memcached
does.

    python examples/memcached_server.py --port 11211 [--shards N] [-m MB] [-I 1m]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import zlib
from typing import Any

import shardloop
from memcached_store import (
    INT_MAX,
    KEY_MAX,
    LINE_MAX,
    MAX_WORDS,
    MULTIGET_MAX,
    STARTED,
    Store,
    cost,
    expiry,
    flush_time,
    item_total,
    parse_i32,
    parse_u32,
    parse_u64,
    words,
)
from shardloop import shard

VERSION = "1.6.0-shardloop"
MB = 1024 * 1024
SMALL_VALUE = 16 * 1024  # read at once; larger values are read in pieces
OUT_CHUNK = 64 * 1024  # a multiget reply is written and drained in pieces of this size

_stores: dict[int, Store] = {}
Row = tuple[int, bytes, int]  # an item's flags, value and cas unique


def local() -> Store:
    return _stores[shard.id()]


def make_store(limit: int, item_size_max: int) -> None:
    me, count = shard.id(), shard.count()
    part = limit // count + (1 if me < limit % count else 0)
    _stores[me] = Store(part, item_size_max, first_cas=1 + me * (1 << 48))


def owner(key: bytes) -> int:
    count = shard.count()
    return zlib.crc32(key) % count if count > 1 else 0


async def on_owner(key: bytes, method: str, *args: object) -> Any:
    """Runs a Store method on the shard that owns ``key``."""
    target = owner(key)
    if target == shard.id():
        return getattr(local(), method)(key, *args)
    return await shard.submit_to(target, _call_store, method, key, *args)


def _call_store(method: str, key: bytes, *args: object) -> Any:
    return getattr(local(), method)(key, *args)


def _get_many(keys: list[bytes], touch: float | None) -> list[Row | None]:
    return local().get(keys, touch)


async def read_line(conn: shardloop.Connection) -> bytes | None:
    """The next command line; None when the connection must close."""
    try:
        return await conn.read_until(b"\n", limit=LINE_MAX - 1)
    except asyncio.LimitOverrunError:
        pass
    # memcached: a line that does not fit its read buffer "_has_ to be a large
    # multiget, if not we should just nuke the connection".
    head = await conn.read(LINE_MAX)
    command = head.lstrip(b" ")
    if len(head) - len(command) > 100 or not command.startswith((b"get ", b"gets ")):
        return None
    parts, size = [head], len(head)
    while size <= MULTIGET_MAX:
        try:
            parts.append(await conn.read_until(b"\n", limit=LINE_MAX))
            return b"".join(parts)
        except asyncio.LimitOverrunError:
            parts.append(await conn.read(LINE_MAX))
            size += len(parts[-1])
    return None


async def read_value(conn: shardloop.Connection, size: int) -> bytes:
    """The data block of a storage command, read in pieces when it is large
    so that the connection's buffer stays small."""
    if size <= SMALL_VALUE:
        return await conn.read_exactly(size)
    parts, left = [], size
    while left:
        part = await conn.read(min(left, 65536))
        if not part:
            raise asyncio.IncompleteReadError(b"".join(parts), size)
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


async def discard(conn: shardloop.Connection, size: int) -> None:
    """Reads and drops the data block of a refused command."""
    while size > 0:
        chunk = await conn.read(min(size, 65536))
        if not chunk:
            return
        size -= len(chunk)


async def handle(conn: shardloop.Connection) -> None:
    me, store = shard.id(), local()
    try:
        while (line := await read_line(conn)) is not None:
            tokens = words(line)
            if (
                len(tokens) == 2
                and tokens[0] == b"get"
                and len(tokens[1]) <= KEY_MAX
                and owner(tokens[1]) == me
            ):
                # The most common command, for a key of this shard: served in place.
                reply: bytes | None = store.get_one(tokens[1])
            else:
                reply = await command(tokens, conn)
                if reply is None:  # quit, or a line memcached closes on
                    return
            if reply:
                conn.write(reply)
                await conn.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        return  # the client left, maybe half-way through a command


async def command(tokens: list[bytes], conn: shardloop.Connection) -> bytes | None:
    """The reply to one command line, as memcached's process_command_ascii
    dispatches it: on the first letter, then the name and the word count
    (``n`` counts memcached's terminal token too)."""
    args = tokens[:MAX_WORDS]
    n = len(args) + 1
    if n < 2 or len(args[0]) < 2:
        return b"ERROR\r\n"
    name = args[0]
    if name in (b"get", b"gets", b"gat", b"gats", b"bget"):
        return await get(tokens, conn) if n >= 3 else b"ERROR\r\n"
    if name in STORAGE:
        wanted = 7 if name == b"cas" else 6
        if n not in (wanted, wanted + 1):
            return b"ERROR\r\n"
        return await storage(args, conn)
    if name in (b"incr", b"decr"):
        return await arith(args) if n in (4, 5) else b"ERROR\r\n"
    if name == b"delete":
        return await delete(args) if 3 <= n <= 5 else b"ERROR\r\n"
    if name == b"touch":
        return await touch(args) if n in (4, 5) else b"ERROR\r\n"
    if name == b"flush_all":
        return await flush_all(args) if 2 <= n <= 4 else b"ERROR\r\n"
    if name == b"version":
        return b"VERSION %s\r\n" % VERSION.encode()  # extra words are ignored, as by memcached
    if name == b"verbosity":
        if n not in (3, 4):
            return b"ERROR\r\n"
        level = parse_u32(args[1])
        return out(b"OK" if level is not None else BAD_FORMAT, args[-1] == b"noreply")
    if name == b"stats":
        if n == 2:
            return await stats()
        if args[1] == b"reset":
            await shard.invoke_on_all(_reset_stats)
            return b"RESET\r\n"
        return b"ERROR\r\n"  # memcached's stats settings/items/slabs/...: not here
    if name == b"shutdown":
        return b"ERROR: shutdown not enabled\r\n"
    if name == b"quit":
        return None
    meta = len(name) == 2 and name[:1] == b"m"  # memcached's meta commands: not here
    if not meta and name[:1] not in b"gsacidt" and args[-1].startswith(b"HTTP/"):
        return None  # memcached hangs up on an HTTP request
    return b"ERROR\r\n"


def out(reply: bytes, noreply: bool) -> bytes:
    """``reply`` as a line, or nothing for noreply. memcached decides that
    from the command's last word (set_noreply_maybe), before parsing the
    others, so the errors a noreply command causes are silent too."""
    return b"" if noreply else reply + b"\r\n"


BAD_FORMAT = b"CLIENT_ERROR bad command line format"


async def get(tokens: list[bytes], conn: shardloop.Connection) -> bytes:
    """get/gets/gat/gats (bget: get). The reply is written here, in pieces,
    so that a multiget of large values is never held whole."""
    name, keys, touch = tokens[0], tokens[1:], None
    if name in (b"gat", b"gats"):
        exptime = parse_i32(tokens[1])
        if exptime is None:
            return b"CLIENT_ERROR invalid exptime argument\r\n"
        touch, keys = expiry(exptime, time.time()), tokens[2:]
    too_long = next((i for i, key in enumerate(keys) if len(key) > KEY_MAX), None)
    if too_long is not None:
        # memcached fetches (and touches) the keys before the long one first.
        await fetch(keys[:too_long], touch)
        return BAD_FORMAT + b"\r\n"
    found = await fetch(keys, touch)
    with_cas = name in (b"gets", b"gats")
    parts: list[bytes] = []
    size = 0
    for key, row in zip(keys, found, strict=True):
        if row is None:
            continue
        flags, value, cas = row
        head = b"VALUE %s %d %d" % (key, flags, len(value))
        head += b" %d\r\n" % cas if with_cas else b"\r\n"
        parts += [head, value, b"\r\n"]
        size += len(head) + len(value) + 2
        if size > OUT_CHUNK:
            conn.write(b"".join(parts))
            await conn.drain()
            parts, size = [], 0
    parts.append(b"END\r\n")
    return b"".join(parts)


async def fetch(keys: list[bytes], touch: float | None) -> list[Row | None]:
    """(flags, value, cas) for each key or None, one call per owner."""
    by_owner: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by_owner.setdefault(owner(key), []).append(i)
    found: list[Row | None] = [None] * len(keys)
    for target, places in by_owner.items():
        group = [keys[i] for i in places]
        rows = (
            local().get(group, touch)
            if target == shard.id()
            else await shard.submit_to(target, _get_many, group, touch)
        )
        for i, row in zip(places, rows, strict=True):
            found[i] = row
    return found


STORAGE = {b"set", b"add", b"replace", b"append", b"prepend", b"cas"}


async def storage(args: list[bytes], conn: shardloop.Connection) -> bytes:
    """set/add/replace/append/prepend/cas, checked in memcached's order."""
    name, key, noreply = args[0], args[1], args[-1] == b"noreply"
    if len(key) > KEY_MAX:
        return out(BAD_FORMAT, noreply)
    flags, exptime, length = parse_u32(args[2]), parse_i32(args[3]), parse_i32(args[4])
    cas = parse_u64(args[5]) if name == b"cas" else 0
    if flags is None or exptime is None or length is None or cas is None:
        return out(BAD_FORMAT, noreply)
    if length < 0 or length > INT_MAX - 2:
        return out(BAD_FORMAT, noreply)
    size = length + 2  # the data and its CRLF
    store = local()
    if item_total(len(key), flags, size) > store.item_size_max:
        refused = b"SERVER_ERROR object too large for cache"
    elif not store.reserve(room := cost(key, b"") + length):
        refused = b"SERVER_ERROR out of memory storing object"
    else:
        try:
            data = await read_value(conn, size)
        finally:
            store.release(room)
        if data[-2:] != b"\r\n":
            return out(b"CLIENT_ERROR bad data chunk", noreply)
        expires = expiry(exptime, time.time())
        result = await on_owner(key, "store", name.decode(), flags, expires, data[:-2], cas)
        return out(result, noreply)
    # Refused: answer at once, drop the data as it comes, and (for a set) the
    # old value, as memcached does.
    conn.write(out(refused, noreply))
    if name == b"set":
        await on_owner(key, "forget")
    await discard(conn, size)
    return b""


async def arith(args: list[bytes]) -> bytes:
    noreply = args[-1] == b"noreply"
    if len(args[1]) > KEY_MAX:
        return out(BAD_FORMAT, noreply)
    delta = parse_u64(args[2])
    if delta is None:
        return out(b"CLIENT_ERROR invalid numeric delta argument", noreply)
    return out(await on_owner(args[1], "arith", delta, args[0] == b"incr"), noreply)


async def delete(args: list[bytes]) -> bytes:
    """delete <key> [0] [noreply]: memcached still takes the old hold time
    of 0, and looks for noreply only after more than a key."""
    noreply = len(args) > 2 and args[-1] == b"noreply"
    if len(args) > 2:
        zero = args[2] == b"0"
        if not ((len(args) == 3 and (zero or noreply)) or (zero and noreply)):
            usage = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]"
            return out(usage, noreply)
    if len(args[1]) > KEY_MAX:
        return out(BAD_FORMAT, noreply)
    return out(await on_owner(args[1], "delete"), noreply)


async def touch(args: list[bytes]) -> bytes:
    noreply = args[-1] == b"noreply"
    if len(args[1]) > KEY_MAX:
        return out(BAD_FORMAT, noreply)
    exptime = parse_i32(args[2])
    if exptime is None:
        return out(b"CLIENT_ERROR invalid exptime argument", noreply)
    return out(await on_owner(args[1], "touch", expiry(exptime, time.time())), noreply)


async def flush_all(args: list[bytes]) -> bytes:
    """flush_all [delay] [noreply]; memcached reads a delay whenever the
    words are not exactly "flush_all" or "flush_all noreply"."""
    noreply, exptime = args[-1] == b"noreply", 0
    if len(args) != (2 if noreply else 1):
        parsed = parse_i32(args[1])
        if parsed is None:
            return out(b"CLIENT_ERROR invalid exptime argument", noreply)
        exptime = parsed
    await shard.invoke_on_all(_flush, flush_time(exptime, time.time()))
    return out(b"OK", noreply)


def _flush(oldest_live: float) -> None:
    local().flush(oldest_live)


def _reset_stats() -> None:
    local().reset_stats()


async def stats() -> bytes:
    per_shard = await shard.invoke_on_all(_shard_stats)
    total = {k: sum(s[k] for s in per_shard) for k in per_shard[0]}
    now = time.time()
    lines = [
        (b"pid", b"%d" % os.getpid()),
        (b"uptime", b"%d" % int(now - STARTED)),
        (b"time", b"%d" % int(now)),
        (b"version", VERSION.encode()),
        (b"threads", b"%d" % shard.count()),
    ] + [(k.encode(), b"%d" % v) for k, v in total.items()]
    return b"".join(b"STAT %s %s\r\n" % pair for pair in lines) + b"END\r\n"


def _shard_stats() -> dict[str, int]:
    return local().stats()


def item_size(text: str) -> int:
    """memcached's -I: bytes, or with a k or m suffix; 1k to 1024m."""
    scale = {"k": 1024, "m": MB}.get(text[-1:].lower(), 1)
    size = int(text[:-1] if scale > 1 else text) * scale
    if not 1024 <= size <= 1024 * MB:
        raise argparse.ArgumentTypeError("the item size must be between 1k and 1024m")
    return size


async def start(
    host: str, port: int, memory: int = 64 * MB, item_size_max: int = MB
) -> shardloop.ShardedServer:
    await shard.invoke_on_all(make_store, memory, item_size_max)
    return await shardloop.serve_connections(handle, host, port)


async def main(args: argparse.Namespace) -> None:
    server = await start(args.host, args.port, args.memory_limit * MB, args.max_item_size)
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
    parser.add_argument(
        "-m",
        "--memory-limit",
        type=int,
        default=64,
        metavar="MB",
        help="item memory in megabytes, split between the shards (default: 64)",
    )
    parser.add_argument(
        "-I",
        "--max-item-size",
        type=item_size,
        default=MB,
        metavar="SIZE",
        help="largest item, as memcached counts it (default: 1m)",
    )
    parser.add_argument(
        "--idle-poll",
        type=float,
        default=200e-6,
        help="seconds an idle shard polls before it sleeps (0: sleep at once)",
    )
    arguments = parser.parse_args()
    try:
        shardloop.run(main(arguments), shards=arguments.shards, idle_poll=arguments.idle_poll)
    except KeyboardInterrupt:
        pass
