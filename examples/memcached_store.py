"""memcached's text protocol as memcached 1.6 reads it, and one shard's store.

The rules here copy memcached 1.6.18's ``proto_text.c``, ``util.c`` and
``items.c`` so that the example answers what memcached answers, byte for byte:
how a line is cut into words, how numbers are parsed (C's ``strtoul``
and ``strtol`` on 64 bits, then cut to 32 bits where memcached stores them in
32), which item is too large, and how incr/decr rewrite a value.
``memcached_server.py`` reads connections and sends commands to the shard
that owns the key; a :class:`Store` is one shard's part of the data.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass

KEY_MAX = 250
#: memcached's read buffer: a command line must fit in it, unless it is a
#: multiget ("get"/"gets" after at most 100 spaces), which memcached reads
#: into a buffer that grows. Ours grows up to MULTIGET_MAX, then the
#: connection closes (as memcached closes it for any other long line).
LINE_MAX = 16384
MULTIGET_MAX = 1 << 20
#: memcached keeps the first 23 words of a line (the rest only for get).
MAX_WORDS = 23
#: memcached's item header, the NUL after the key and the CAS: an item of
#: nkey, flags and nbytes (data and its CRLF) needs this much of -I.
ITEM_HEADER = 48 + 1 + 8
#: Items larger than this are stored in chunks, and incr/decr refuse them.
CHUNK_MAX = 512 * 1024
#: What one item's Python objects (Item, the bytes of its key and value, its
#: place in the LRU) take beyond its key and value bytes, measured with
#: tracemalloc: the memory limit counts it so that it bounds what we hold.
ITEM_OVERHEAD = 300
THIRTY_DAYS = 60 * 60 * 24 * 30
U64 = 2**64
INT_MAX = 2**31 - 1
_SPACE = b" \t\n\v\f\r"  # C's isspace()

STARTED = time.time()


def words(line: bytes) -> list[bytes]:
    """A command line's words, as memcached's tokenizer finds them: the
    newline (and a carriage return before it) and anything from a NUL on cut
    off, then split at spaces only (a tab is part of a word)."""
    line = line[:-2] if line[-2:] == b"\r\n" else line.removesuffix(b"\n")
    if b"\0" in line:
        line = line[: line.index(b"\0")]
    found = line.split(b" ")
    return [word for word in found if word] if b"" in found else found


def _strto(text: bytes, unsigned: bool) -> int | None:
    """C's ``strtoull``/``strtol`` (64-bit) as memcached's ``safe_strto*``
    accept them: leading white space and a sign allowed, digits required,
    then white space or the end; None where they fail (no digits, other
    characters, out of range, or a negative number read as unsigned)."""
    body = text.lstrip(_SPACE)
    start = 1 if body[:1] in (b"+", b"-") else 0
    end = start
    while end < len(body) and 48 <= body[end] <= 57:
        end += 1
    if end == start or (end < len(body) and body[end] not in _SPACE):
        return None
    digits = body[start:end].lstrip(b"0") or b"0"
    if len(digits) > 20:
        return None  # ERANGE, and more digits than int() should be given
    negative, magnitude = body[:1] == b"-", int(digits)
    if unsigned:
        if magnitude >= U64:
            return None
        value = -magnitude % U64 if negative else magnitude
        # memcached: "only check for negative signs in the uncommon case when
        # the unsigned number is so big that it's negative as a signed number"
        return None if value >= 2**63 and b"-" in text else value
    if magnitude > 2**63 - (0 if negative else 1):
        return None
    return -magnitude if negative else magnitude


def parse_u64(token: bytes) -> int | None:
    """memcached's ``safe_strtoull``: cas uniques, incr/decr deltas."""
    if token.isdigit() and len(token) < 10:  # the usual case
        return int(token)
    return _strto(token, unsigned=True)


def parse_u32(token: bytes) -> int | None:
    """``safe_strtoul`` into a 32-bit field: flags 4294967297 are 1."""
    if token.isdigit() and len(token) < 10:
        return int(token)
    value = _strto(token, unsigned=True)
    return None if value is None else value & 0xFFFFFFFF


def parse_i32(token: bytes) -> int | None:
    """``safe_strtol`` into a 32-bit field: exptimes and byte counts, so a
    byte count of 4294967296 is 0 and 2147483648 is negative."""
    if token.isdigit() and len(token) < 10:
        return int(token)
    value = _strto(token, unsigned=False)
    return None if value is None else (value + 2**31) % 2**32 - 2**31


def item_total(nkey: int, flags: int, nbytes: int) -> int:
    """What memcached's slab allocator needs for an item (``ITEM_ntotal``);
    ``nbytes`` counts the data's CRLF. Above -I: "object too large"."""
    return ITEM_HEADER + nkey + (4 if flags else 0) + nbytes


def expiry(exptime: int, now: float) -> float:
    """memcached's rule for an exptime: 0 never, negative already expired, up
    to 30 days relative, beyond that a unix time (one in the past: expired).
    Returns a unix time, 0.0 for never and -1.0 for already expired."""
    if exptime == 0:
        return 0.0
    if exptime < 0:
        return -1.0
    if exptime > THIRTY_DAYS:
        return float(exptime) if exptime > now else -1.0
    return now + exptime


def flush_time(exptime: int, now: float) -> float:
    """memcached's "oldest live" time for ``flush_all exptime``: once it has
    passed, items stored up to it are gone. A second before the time given
    (``now`` if none); 0.0, no flush at all, for a unix time from before the
    server started (memcached's realtime() makes it 1, and 1 - 1 is 0)."""
    if exptime <= 0:
        return now - 1
    if exptime > THIRTY_DAYS:
        # memcached's start time is set 62 s early ("so things like
        # settings.oldest_live ... are never zero").
        return exptime - 1.0 if exptime > STARTED - 62 else 0.0
    return now + exptime - 1


@dataclass(slots=True)
class Item:
    value: bytes
    flags: int
    expires: float  # a unix time; 0.0: never
    cas: int
    stored: float  # when it was stored: flush_all drops older items


def cost(key: bytes, value: bytes) -> int:
    """What an item counts against the memory limit."""
    return ITEM_OVERHEAD + len(key) + len(value)


COUNTERS = (
    "cmd_get",
    "cmd_set",
    "cmd_touch",
    "get_hits",
    "get_misses",
    "touch_hits",
    "touch_misses",
    "total_items",
    "evictions",
    "reclaimed",
)


class Store:
    """One shard's part of the data, touched only by its own shard: items in
    least recently used order, evicted from the front when storing (or
    reserving room for a value still arriving) would pass ``limit`` bytes."""

    def __init__(self, limit: int, item_size_max: int, first_cas: int) -> None:
        self.items: OrderedDict[bytes, Item] = OrderedDict()
        self.limit = limit
        self.item_size_max = item_size_max
        self.used = 0  # what the items cost
        self.reserved = 0  # room held for values being received
        self.cas_ids = itertools.count(first_cas)
        # flush_all, applied lazily as memcached applies it (item_is_flushed):
        # once oldest_live has passed, items stored up to it, and items older
        # than oldest_cas, are gone. A later flush_all replaces both, so
        # "flush_all <a past unix time>" brings flushed items back, as in
        # memcached.
        self.oldest_live = 0.0
        self.oldest_cas = 0
        self.counts = dict.fromkeys(COUNTERS, 0)

    # Memory.

    def reserve(self, size: int) -> bool:
        """Holds ``size`` bytes for a value being received, evicting to make
        room; False when even an empty store cannot give it."""
        if not self._room(size):
            return False
        self.reserved += size
        return True

    def release(self, size: int) -> None:
        self.reserved -= size

    def _room(self, size: int) -> bool:
        while self.used + self.reserved + size > self.limit and self.items:
            key, item = self.items.popitem(last=False)
            self.used -= cost(key, item.value)
            self.counts["reclaimed" if self._dead(item, time.time()) else "evictions"] += 1
        return self.used + self.reserved + size <= self.limit

    def _put(self, key: bytes, item: Item) -> bool:
        """Links ``item`` as the most recently used (the key must be absent)."""
        size = cost(key, item.value)
        if not self._room(size):
            return False
        self.items[key] = item
        self.used += size
        return True

    def _drop(self, key: bytes) -> Item | None:
        item = self.items.pop(key, None)
        if item is not None:
            self.used -= cost(key, item.value)
        return item

    # Lookups.

    def _dead(self, item: Item, now: float) -> bool:
        if item.expires and item.expires <= now:
            return True
        if not self.oldest_live or self.oldest_live > now:
            return False
        return item.stored <= self.oldest_live or item.cas < self.oldest_cas

    def _live(self, key: bytes) -> Item | None:
        item = self.items.get(key)
        if item is None:
            return None
        if (item.expires or self.oldest_live) and self._dead(item, time.time()):
            self._drop(key)
            return None
        self.items.move_to_end(key)
        return item

    def get_one(self, key: bytes) -> bytes:
        """The whole reply to ``get key``."""
        self.counts["cmd_get"] += 1
        item = self._live(key)
        if item is None:
            self.counts["get_misses"] += 1
            return b"END\r\n"
        self.counts["get_hits"] += 1
        return b"VALUE %s %d %d\r\n%s\r\nEND\r\n" % (key, item.flags, len(item.value), item.value)

    def get(self, keys: list[bytes], touch: float | None) -> list[tuple[int, bytes, int] | None]:
        """(flags, value, cas) for each key, None where it is missing; in
        order, so that a key asked twice can be found, then not (after a
        gat that expires it). ``touch``: a new expiry for them (gat)."""
        found: list[tuple[int, bytes, int] | None] = []
        kind = "get" if touch is None else "touch"
        for key in keys:
            self.counts[f"cmd_{kind}"] += 1
            item = self._live(key)
            if item is None:
                self.counts[f"{kind}_misses"] += 1
                found.append(None)
                continue
            self.counts[f"{kind}_hits"] += 1
            if touch is not None:
                item.expires = touch
            found.append((item.flags, item.value, item.cas))
        return found

    # Changes.

    def store(
        self, key: bytes, cmd: str, flags: int, expires: float, value: bytes, cas: int
    ) -> bytes:
        """set/add/replace/append/prepend/cas as memcached's do_store_item."""
        self.counts["cmd_set"] += 1
        old = self._live(key)
        if old is None:
            if cmd in ("replace", "append", "prepend"):
                return b"NOT_STORED"
            if cmd == "cas":
                return b"NOT_FOUND"
        elif cmd == "add":
            return b"NOT_STORED"
        elif cmd == "cas" and cas != old.cas:
            return b"EXISTS"
        elif cmd in ("append", "prepend"):
            value = old.value + value if cmd == "append" else value + old.value
            flags, expires = old.flags, old.expires
            if item_total(len(key), flags, len(value) + 2) > self.item_size_max:
                return b"NOT_STORED"
        self._drop(key)
        if expires < 0:  # stored already expired: nothing to keep
            self.counts["total_items"] += 1
            return b"STORED"
        item = Item(value, flags, expires, next(self.cas_ids), time.time())
        if not self._put(key, item):
            if old is not None and cmd != "set":
                self._put(key, old)  # memcached keeps the old item unless it was a set
            if cmd in ("append", "prepend"):
                return b"NOT_STORED"
            return b"SERVER_ERROR out of memory storing object"
        self.counts["total_items"] += 1
        return b"STORED"

    def forget(self, key: bytes) -> None:
        """A set that could not be stored removes the old value (memcached:
        "avoid stale data persisting in cache because we failed alloc")."""
        self._drop(key)

    def delete(self, key: bytes) -> bytes:
        if self._live(key) is None:
            return b"NOT_FOUND"
        self._drop(key)
        return b"DELETED"

    def arith(self, key: bytes, delta: int, incr: bool) -> bytes:
        """incr/decr as memcached's do_add_delta: the value is read as C's
        strtoull reads it; a result no longer than the value is written over
        it, padded with spaces ("99 " after decrementing "100")."""
        item = self._live(key)
        if item is None:
            return b"NOT_FOUND"
        current = None
        if item.value and item_total(len(key), item.flags, len(item.value) + 2) <= CHUNK_MAX:
            current = parse_u64((item.value + b"\r\n").split(b"\0", 1)[0])
        if current is None:
            return b"CLIENT_ERROR cannot increment or decrement non-numeric value"
        result = (current + delta) % U64 if incr else max(0, current - delta)
        digits = b"%d" % result
        if len(digits) <= len(item.value):
            item.value = digits.ljust(len(item.value))
        else:
            self.used += len(digits) - len(item.value)
            item.value = digits
        item.cas = next(self.cas_ids)
        return digits

    def touch(self, key: bytes, expires: float) -> bytes:
        self.counts["cmd_touch"] += 1
        item = self._live(key)
        if item is None:
            self.counts["touch_misses"] += 1
            return b"NOT_FOUND"
        self.counts["touch_hits"] += 1
        item.expires = expires
        return b"TOUCHED"

    def flush(self, oldest_live: float) -> None:
        """flush_all (see :func:`flush_time`); flushed items are dropped when
        next looked up or evicted, as memcached drops them."""
        self.oldest_live = oldest_live
        if oldest_live <= time.time():
            self.oldest_cas = next(self.cas_ids)

    def stats(self) -> dict[str, int]:
        return {
            **self.counts,
            "curr_items": len(self.items),
            "bytes": self.used,
            "limit_maxbytes": self.limit,
        }

    def reset_stats(self) -> None:
        self.counts = dict.fromkeys(COUNTERS, 0)
