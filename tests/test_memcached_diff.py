"""The memcached example against the real memcached, byte for byte: the same
bytes go to both servers, and the replies must be the same.

Replies that legitimately differ are normalised first: cas uniques become
their order of first appearance (each server numbers its own), and VERSION
lines lose their version; stats are compared by structure only. Each case
runs on a fresh connection to each server, followed by a ``version``
sentinel whose reply marks the end of the case's replies (or by nothing,
when the case ends in a closed connection). SHARDLOOP_DIFF_CASES=N sets how
many random cases run (default 500); SHARDLOOP_DIFF_SEED picks their seed.
"""

from __future__ import annotations

import os
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from loadgen import free_port

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "memcached_server.py"
MEMCACHED = shutil.which("memcached")
CASES = int(os.environ.get("SHARDLOOP_DIFF_CASES", "500"))
SEED = int(os.environ.get("SHARDLOOP_DIFF_SEED", "20240611"))
SENTINEL = b"version\r\n"
ENDS_WITH_VERSION = re.compile(rb"(?:^|\r\n)(VERSION [^\r\n]*\r\n)\Z")


@pytest.fixture
def test_limit() -> float:
    """These tests drive real servers: a longer limit (tests/conftest.py)."""
    return 240


def wait_until_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{proc.args} does not listen on {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@dataclass
class Server:
    """One server, and what its replies taught us: its cas uniques in order
    of first appearance, and the last one seen for each key."""

    name: str
    port: int
    cas_order: dict[bytes, int] = field(default_factory=dict)
    last_cas: dict[bytes, bytes] = field(default_factory=dict)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Server, Server]]:
    """The real memcached and the example on 2 shards, both on loopback."""
    if MEMCACHED is None:
        pytest.skip("the memcached binary is missing (apt-get install memcached; make tools)")
    real_port, example_port = free_port(), free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []  # memcached refuses root otherwise
    # Without its LRU threads, which hold items now and then: memcached
    # rewrites an incremented value in place only when nothing else holds it.
    quiet = ["-o", "no_lru_crawler,no_lru_maintainer"]
    real = subprocess.Popen(
        [MEMCACHED, "-l", "127.0.0.1", "-p", str(real_port), "-U", "0", *user, *quiet],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        example = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--port", str(example_port), "--shards", "2"],
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_until_listening(real, real_port)
            wait_until_listening(example, example_port)
            yield Server("memcached", real_port), Server("example", example_port)
        finally:
            stop(example)
    finally:
        stop(real)


def exchange(port: int, data: bytes, sentinel: bool, timeout: float = 5) -> tuple[bytes, str]:
    """Sends ``data`` (then the sentinel) while reading the replies, until
    the sentinel's reply, the end of the connection or ``timeout``. Returns
    the replies before the sentinel's and how the exchange ended: "open",
    "closed" (an end of stream or a reset: memcached resets when it closes
    with unread input) or "timeout"."""
    if sentinel:
        data += SENTINEL
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    view, sent, received = memoryview(data), 0, bytearray()
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            for _, events in selector.select(left):
                if events & selectors.EVENT_WRITE:
                    try:
                        sent += sock.send(view[sent : sent + 65536])
                    except (BrokenPipeError, ConnectionResetError):
                        sent = len(data)
                    if sent == len(data):
                        selector.modify(sock, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(1 << 20)
                    except ConnectionResetError:
                        chunk = b""
                    except BlockingIOError:
                        continue
                    if not chunk:
                        return bytes(received), "closed"
                    received += chunk
                    end = ENDS_WITH_VERSION.search(received) if sentinel else None
                    if end and sent == len(data):
                        return bytes(received[: end.start(1)]), "open"
        return bytes(received), "timeout"
    finally:
        selector.close()
        sock.close()


def normalise(reply: bytes, server: Server) -> bytes:
    """The reply with cas uniques numbered in order of first appearance and
    versions dropped; VALUE data blocks are skipped by their length."""
    out, pos = [], 0
    while pos < len(reply):
        end = reply.find(b"\r\n", pos)
        if end < 0:
            out.append(reply[pos:])
            break
        words = reply[pos:end].split(b" ")
        pos = end + 2
        if words[0] == b"VALUE" and len(words) in (4, 5) and words[3].isdigit():
            if len(words) == 5:
                server.last_cas[words[1]] = words[4]
                words[4] = b"cas#%d" % server.cas_order.setdefault(words[4], len(server.cas_order))
            size = int(words[3])
            out += [b" ".join(words), reply[pos : pos + size]]
            pos += size + 2
        elif words[0] == b"VERSION":
            out.append(b"VERSION *")
        else:
            out.append(b" ".join(words))
    return b"\r\n".join(out)


def send_case(server: Server, commands: list[bytes], sentinel: bool) -> tuple[bytes, str]:
    """Runs one case on ``server``: ``<CAS>`` in a command becomes the last
    cas unique this server gave for the command's key (0 if none)."""
    data = b"".join(
        cmd.replace(b"<CAS>", server.last_cas.get(cmd.split(b" ")[1], b"0"))
        if b"<CAS>" in cmd
        else cmd
        for cmd in commands
    )
    reply, ending = exchange(server.port, data, sentinel)
    return normalise(reply, server), ending


def compare(servers: tuple[Server, Server], commands: list[bytes], sentinel: bool = True) -> str:
    """Runs a case on both servers; a description of the difference, or ""."""
    real, example = (send_case(server, commands, sentinel) for server in servers)
    if real == example:
        return ""
    same = min(len(real[0]), len(example[0]))
    at = next((i for i in range(same) if real[0][i] != example[0][i]), same)
    start = max(0, at - 200)
    return (
        f"case {shorten(b''.join(commands))}\n  replies differ at byte {at}:"
        f"\n  memcached: {shorten(real[0][start:])} ({real[1]})"
        f"\n  example:   {shorten(example[0][start:])} ({example[1]})"
    )


def shorten(data: bytes, limit: int = 400) -> str:
    return repr(data[:limit]) + (f"... ({len(data)} bytes)" if len(data) > limit else "")


# Cases that check a rule each: every command, every error path.

LONG = b"l" * 251  # one byte more than a key may have
MAX_KEY = b"m" * 250
TOO_LARGE = 1048517  # for key "k" and flags 0: an item of 1 MiB + 1 byte in memcached
BAD_COUNTS = [
    b"1e23",
    b"4294967296",
    b"4294967295",
    b"2147483648",
    b"-1",
    b"abc",
    b"99999999999999999999",
]
BAD_NUMBERS = [b"4294967296", b"4294967297", b"2147483648", b"-1", b"-0", b"+5", b"x", b"1e23"]
BIG_NUMBERS = [b"18446744073709551615", b"18446744073709551616", b"-18446744073709551615"]
FLUSH = b"flush_all\r\n"


def storage_cases() -> Iterator[list[bytes]]:
    for name in (b"set", b"add", b"replace", b"append", b"prepend", b"cas"):
        cas = b" 1" if name == b"cas" else b""
        for count in BAD_COUNTS:
            yield [
                FLUSH,
                b"set k 0 0 1\r\nv\r\n",
                b"%s k 0 0 %s%s\r\nxyz\r\nget k\r\n" % (name, count, cas),
            ]
        yield [b"%s %s 0 0 1%s\r\nx\r\n" % (name, LONG, cas)]
        yield [FLUSH, b"%s %s 0 0 1%s\r\nx\r\nget %s\r\n" % (name, MAX_KEY, cas, MAX_KEY)]
        yield [b"%s k 0 0 %d%s\r\n" % (name, TOO_LARGE, cas), b"z" * TOO_LARGE + b"\r\nget k\r\n"]
        yield [b"%s k 0 0 %d%s noreply\r\n" % (name, TOO_LARGE, cas), b"z" * TOO_LARGE + b"\r\n"]
        yield [
            b"%s k 0 0 3%s\r\nabcde\r\n" % (name, cas),
            b"%s k 0 0 3%s noreply\r\nabcde\r\n" % (name, cas),
        ]
        yield [b"%s k 0 0%s\r\n" % (name, cas), b"%s k 0 0 1%s noreply x\r\nv\r\n" % (name, cas)]
        yield [b"%s k 0 0 1%s junk\r\nv\r\n" % (name, cas), b"%s k 0 0 noreply\r\nv\r\n" % name]
    for flags in BAD_NUMBERS + BIG_NUMBERS:
        yield [FLUSH, b"set k %s 0 1\r\nv\r\nget k\r\nappend k 0 0 1\r\nw\r\ngets k\r\n" % flags]
    for exptime in [*BAD_NUMBERS, *BIG_NUMBERS, b"2592000", b"2592001", b"2000000000"]:
        yield [FLUSH, b"set k 0 %s 1\r\nv\r\nget k\r\n" % exptime]
    yield [FLUSH, b"set k 0 0 4294967296\r\n\r\nget k\r\n"]  # a count of 2**32 is 0
    yield [FLUSH, b"set k 0 0 4294967298\r\nab\r\nget k\r\n"]
    yield [FLUSH, b"set k 0 0 1048516\r\n" + b"y" * 1048516 + b"\r\nget k\r\n"]  # the largest
    yield [FLUSH, b"set k 1 0 1048513\r\n" + b"y" * 1048513 + b"\r\n"]  # flags take 4 more
    yield [FLUSH, b"set k 1 0 1048512\r\n" + b"y" * 1048512 + b"\r\n"]
    yield [FLUSH, b"set k 0 0 100000\r\n" + b"y" * 100000 + b"\r\nget k\r\n"]
    yield [FLUSH, b"set k 0 0 1\r\nv\r\nset k 0 0 %d\r\n" % TOO_LARGE + b"z" * TOO_LARGE + b"\r\n"]
    yield [b"get k\r\n"]  # a set refused as too large removed the old value
    yield [FLUSH, b"set k 7 0 1\r\nv\r\nappend k 0 0 1048440\r\n" + b"a" * 1048440 + b"\r\n"]
    yield [b"get k\r\nprepend k 9 0 2\r\nab\r\nappend k 0 -1 2\r\ncd\r\nget k\r\n"]
    yield [FLUSH, b"set k 0 -1 1\r\nv\r\nget k\r\nadd k 0 0 1\r\nw\r\nget k\r\n"]
    yield [FLUSH, b"add k 0 0 1\r\na\r\nadd k 0 0 1\r\nb\r\nreplace k 0 0 1\r\nc\r\nget k\r\n"]
    yield [FLUSH, b"replace k 0 0 1\r\nc\r\nappend k 0 0 1\r\nc\r\nprepend k 0 0 1\r\nc\r\n"]
    yield [FLUSH, b"set k 0 0 1\r\nv\r\ngets k\r\n", b"cas k 0 0 1 <CAS>\r\nw\r\ngets k\r\n"]
    yield [
        b"cas k 0 0 1 <CAS> noreply\r\nx\r\ncas k 0 0 1 0\r\ny\r\ncas k 0 0 1 12345678901\r\nz\r\n"
    ]
    yield [b"cas missing 0 0 1 1\r\nv\r\ncas k 0 0 1 -1\r\nv\r\ncas k 0 0 1 x noreply\r\nv\r\n"]
    yield [b"cas k 0 0 1 18446744073709551616\r\nv\r\ncas k 0 0 1 18446744073709551615\r\nv\r\n"]


def other_cases() -> Iterator[list[bytes]]:
    # A get with a long key comes first on its connection: memcached drops the
    # replies to earlier commands it has not sent yet; the example does not.
    yield [FLUSH, b"set a 0 0 1\r\n1\r\n"]
    for name in (b"get", b"gets", b"bget", b"gat 1000", b"gats -1"):
        yield [b"%s a %s a\r\nget a\r\n" % (name, LONG)]
        yield [b"%s %s\r\n" % (name, LONG)]
    yield [b"bget a\r\nbget\r\n"]
    yield [b"get\r\ngets\r\nget \r\ngetx a\r\ngat\r\ngat 10\r\n"]
    yield [b"gat x a\r\ngat 99999999999999999999 a\r\ngats 4294967296 a\r\n"]
    yield [FLUSH, b"set a 0 0 1\r\n1\r\ngat 1000 a b\r\ngats -1 a\r\nget a\r\n"]
    yield [b"get " + b" ".join(b"k%d" % i for i in range(40)) + b"\r\n"]  # past 24 words
    yield [b"set k 0 0 1 " + b" ".join(b"w%d" % i for i in range(30)) + b"\r\nv\r\n"]
    for name in (b"delete", b"incr", b"decr", b"touch"):
        yield [b"%s %s 1\r\n%s %s 1 noreply\r\n%s %s\r\n" % (name, LONG, name, LONG, name, LONG)]
    yield [FLUSH, b"set k 0 0 1\r\nv\r\ndelete k 0\r\ndelete k 1\r\ndelete k 0 noreply\r\n"]
    yield [
        b"delete\r\ndelete k x noreply\r\ndelete k 0 1\r\ndelete k noreply\r\ndelete a b c d\r\n"
    ]
    yield [b"delete noreply\r\ndelete k 0 noreply x\r\n"]
    for value in [
        b"5",
        b"007",
        b" 12",
        b"5 x",
        b"12ab",
        b"-5",
        b"+5",
        b"",
        b"18446744073709551615",
    ]:
        yield [
            FLUSH,
            b"set n 3 0 %d\r\n%s\r\nincr n 1\r\nget n\r\ndecr n 10\r\ngets n\r\n"
            % (len(value), value),
        ]
    yield [
        b"set n 0 0 3\r\n100\r\ndecr n 1\r\nget n\r\nincr n 5\r\nincr n 18446744073709551615\r\n"
    ]
    for delta in [*BAD_NUMBERS, *BIG_NUMBERS]:
        yield [b"incr n %s\r\ndecr n %s\r\nincr n %s noreply\r\n" % (delta, delta, delta)]
    yield [b"incr missing 1\r\nincr\r\nincr n\r\nincr n 1 2 3\r\ndecr n 1 noreply\r\nget n\r\n"]
    yield [
        FLUSH,
        b"set n 0 0 1\r\n1\r\nincr n 1 junk\r\n"
        + b"set z 0 0 %d\r\n" % 600000
        + b"0" * 599999
        + b"7\r\nincr z 1\r\n",
    ]
    for exptime in [*BAD_NUMBERS, *BIG_NUMBERS, b"1000", b"0"]:
        yield [
            FLUSH,
            b"set t 0 0 1\r\nv\r\ntouch t %s\r\nget t\r\ntouch t %s noreply\r\n"
            % (exptime, exptime),
        ]
    yield [b"touch missing 10\r\ntouch\r\ntouch t\r\ntouch t 1 2 3\r\n"]
    for delay in [*BAD_NUMBERS, *BIG_NUMBERS, b"0", b"1000000000", b"noreply", b"0 noreply"]:
        yield [b"set f 0 0 1\r\nv\r\nflush_all %s\r\nget f\r\n" % delay]
    yield [b"flush_all noreply 5\r\nflush_all x y\r\nflush_all 1 2 3\r\nflush_all 0 junk\r\n"]
    yield [
        b"verbosity\r\nverbosity 1\r\nverbosity x\r\nverbosity 1 noreply\r\nverbosity noreply\r\n"
    ]
    yield [b"verbosity 4294967296\r\nverbosity -1\r\nverbosity 1 2\r\nverbosity 1 2 3\r\n"]
    yield [b"stats reset\r\nstats bogus\r\nshutdown\r\nshutdown graceful\r\n"]
    yield [b"\r\n\n \r\n  \r\nx\r\nbogus\r\nbogus a b c\r\nmx\r\nGET / HTTP\r\n"]
    yield [b"  set  s  0  0  1  \r\nv\r\n get  s \r\nget s\n\r\n"]
    yield [
        b"set t\tb 0 0 1\r\nv\r\nget t\tb\r\nget t\r\nset \xc3\xa9 0 0 1\r\nv\r\nget \xc3\xa9\r\n"
    ]
    yield [b"set z 0 0 1\r\nv\r\nget z\x00 junk\r\nbogus\x00\r\n"]
    yield [b"set k 0 0 1\r\r\nv\r\nget k\r\r\n"]


def closing_cases() -> Iterator[list[bytes]]:
    """Cases whose last command closes the connection: no sentinel."""
    yield [b"set q 0 0 1\r\nv\r\nget q\r\nquit\r\n"]
    yield [b"quit extra words\r\n"]
    yield [b"GET / HTTP/1.1\r\n"]
    yield [b"bogus x HTTP/1.0\r\n"]
    yield [b"set " + b"x" * 20000 + b" 0 0 1\r\n"]  # a line past 16 KiB: memcached hangs up
    yield [b"bogus" + b"x" * 16378 + b"\r\n"]  # 16385 bytes with its newline
    yield [b"gat 0 " + b"k " * 10000 + b"\r\n"]  # only get and gets may be that long
    yield [b" " * 101 + b"get " + b"k " * 10000 + b"\r\n"]


def long_line_cases() -> Iterator[list[bytes]]:
    yield [b"bogus" + b"x" * 16377 + b"\r\n"]  # 16384 bytes with its newline: still a command
    yield [
        b"get " + b" ".join(b"key:%020d" % i for i in range(100)) + b"\r\n"
    ]  # 100 keys of 24 bytes
    yield [b" " * 100 + b"get " + b"k " * 10000 + b"\r\n"]
    yield [b"gets " + b" ".join(b"key:%020d" % i for i in range(12000)) + b"\r\n"]  # 300 KB


@pytest.mark.parametrize(
    "family", ["storage", "other", "closing", "long lines"], ids=lambda f: f.replace(" ", "-")
)
def test_every_command_and_error_path_agrees(servers: tuple[Server, Server], family: str) -> None:
    cases = {
        "storage": storage_cases,
        "other": other_cases,
        "closing": closing_cases,
        "long lines": long_line_cases,
    }[family]
    failures = []
    for case in cases():
        if diff := compare(servers, case, sentinel=family != "closing"):
            failures.append(diff)
        if len(failures) == 10:  # enough to see, and no waiting for more timeouts
            break
    assert not failures, f"{len(failures)} cases differ:\n" + "\n".join(failures[:10])


# Random cases: plausible commands with now and then a bad number, a long
# key, a wrong count, noreply, odd spacing. Values use letters no command
# starts with, so that a data block read as a command line is an ERROR.

VALUE_BYTES = b"xyz0189"
KEYS = [b"k%d" % i for i in range(8)] + [b"t\tb", b"\xc3\xa9", MAX_KEY]
NUMERIC = [b"0", b"5", b"007", b" 12", b"99 ", b"18446744073709551615", b"12ab", b"-5", b"5 x"]
FLAGS = ([b"0", b"1", b"42", b"4294967295"], [b"4294967296", b"+7", b"-0", *BIG_NUMBERS[::2]])
BAD_FLAGS = [b"-1", b"x", b"1e23", BIG_NUMBERS[1]]
EXPTIMES = [b"1000", b"-1", b"2592000", b"2592001", b"4294967296", b"2147483648", b"2000000000"]
BAD_EXPTIMES = [b"99999999999999999999", b"x", b"1.5"]
DELTAS = [b"0", b"1", b"5", b"18446744073709551615", b"+3", b"-0"]
BAD_DELTAS = [b"-1", b"x", b"18446744073709551616"]


def random_value(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.25:
        return rng.choice(NUMERIC)
    if roll < 0.005 + 0.25:
        return b"z" * rng.randint(TOO_LARGE, TOO_LARGE + 100)
    size = rng.choice([0, 1, 2, 3, 5, 10, 100, 1000, 20000]) if roll < 0.95 else 100_000
    return bytes(rng.choice(VALUE_BYTES) for _ in range(size))


def random_storage(rng: random.Random) -> bytes:
    name = rng.choice([b"set", b"set", b"add", b"replace", b"append", b"prepend", b"cas"])
    key = LONG if rng.random() < 0.04 else rng.choice(KEYS)
    value = random_value(rng)
    valid = len(key) <= 250
    flags = rng.choice(FLAGS[0] if rng.random() < 0.8 else FLAGS[1])
    exptime = b"0" if rng.random() < 0.7 else rng.choice(EXPTIMES)
    count = b"%d" % len(value)
    if rng.random() < 0.1:
        flags, exptime = rng.choice(
            [(rng.choice(BAD_FLAGS), exptime), (flags, rng.choice(BAD_EXPTIMES))]
        )
        valid = False
    roll = rng.random()
    if roll < 0.05:
        count, valid = rng.choice(BAD_COUNTS[:1] + BAD_COUNTS[2:]), False
    elif roll < 0.1:
        count = rng.choice([b"+%d", b"0%d", b"%d"]) % (len(value) + (2**32 if roll < 0.07 else 0))
    words = [name, key, flags, exptime, count]
    if name == b"cas":
        roll = rng.random()
        words.append(
            b"<CAS>" if roll < 0.6 else rng.choice([b"0", b"%d" % (2**62 + rng.randint(0, 999))])
        )
        if roll > 0.95:
            words[-1], valid = rng.choice([b"-1", b"x", BIG_NUMBERS[1]]), False
    roll = rng.random()
    if roll < 0.15:
        words.append(b"noreply")
    elif roll < 0.18:
        words.append(b"junk")
    line = (b"  " if rng.random() < 0.05 else b" ").join(words) + b"\r\n"
    if not valid:
        return line + value[:1000] + b"\r\n"  # the data block is read as a command
    if rng.random() < 0.05:
        return line + value + b"ab"  # the right length, not ending in CRLF
    return line + value + b"\r\n"


def random_command(rng: random.Random, first: bool) -> bytes:
    kind = rng.choices(
        ["storage", "get", "arith", "delete", "touch", "gat", "flush", "misc"],
        weights=[40, 22, 12, 8, 6, 4, 2, 6],
    )[0]
    key = LONG if rng.random() < 0.03 else rng.choice(KEYS)
    noreply = b" noreply" if rng.random() < 0.12 else b""
    if kind == "storage":
        return random_storage(rng)
    if kind == "get":
        long = 0.1 if first else 0  # see other_cases()
        keys = [LONG if rng.random() < long else rng.choice(KEYS) for _ in range(rng.randint(1, 6))]
        return rng.choice([b"get", b"gets", b"bget"]) + b" " + b" ".join(keys) + b"\r\n"
    if kind == "arith":
        delta = rng.choice(DELTAS if rng.random() < 0.85 else BAD_DELTAS)
        return b"%s %s %s%s\r\n" % (rng.choice([b"incr", b"decr"]), key, delta, noreply)
    if kind == "delete":
        tail = rng.choice([b"", b"", b" 0", b" noreply", b" 0 noreply", b" 1", b" x noreply"])
        return b"delete %s%s\r\n" % (key, tail)
    exptime = rng.choice(EXPTIMES + [b"0"] * 3 if rng.random() < 0.9 else BAD_EXPTIMES)
    if kind == "touch":
        return b"touch %s %s%s\r\n" % (key, exptime, noreply)
    if kind == "gat":
        keys = b" ".join(rng.choice(KEYS) for _ in range(rng.randint(0, 3)))
        return b"%s %s %s\r\n" % (rng.choice([b"gat", b"gats"]), exptime, keys)
    if kind == "flush":
        # Not a delay, nor a unix time in the past: either makes items flushed
        # earlier visible again until memcached's LRU reclaims them, and it
        # does that from other threads, when they get to it.
        flush = rng.choice([b"flush_all", b"flush_all 0", b"flush_all -1", b"flush_all x"])
        return flush + noreply + b"\r\n"
    return (
        rng.choice(
            [
                b"verbosity 1",
                b"verbosity x",
                b"stats reset",
                b"stats bogus",
                b"bogus",
                b"",
                b" x y",
                b"shutdown",
            ]
        )
        + noreply
        + b"\r\n"
    )


def test_random_sequences_agree(servers: tuple[Server, Server]) -> None:
    rng = random.Random(SEED)
    failures = []
    for _ in range(CASES):
        case = [random_command(rng, first=i == 0) for i in range(rng.randint(1, 6))]
        quits = rng.random() < 0.03
        if quits:
            case.append(b"quit\r\n")
        if diff := compare(servers, case, sentinel=not quits):
            failures.append(diff)
        if len(failures) == 10:
            break
    assert not failures, (
        f"{len(failures)} cases differ (SHARDLOOP_DIFF_SEED={SEED}):\n" + "\n".join(failures[:10])
    )


def stats(port: int) -> dict[bytes, bytes]:
    reply, ending = exchange(port, b"stats\r\n", sentinel=True)
    assert ending == "open" and reply.endswith(b"END\r\n"), reply[-200:]
    lines = reply.split(b"\r\n")[:-2]
    assert all(line.startswith(b"STAT ") and line.count(b" ") >= 2 for line in lines), lines
    return {line.split(b" ")[1]: line.split(b" ", 2)[2] for line in lines}


def test_stats_have_memcached_structure_and_memory_fields(servers: tuple[Server, Server]) -> None:
    real, example = (stats(server.port) for server in servers)
    for name in [b"pid", b"uptime", b"time", b"version", b"threads", b"curr_items", b"total_items"]:
        assert name in real and name in example, name
    for name in [b"bytes", b"limit_maxbytes", b"evictions", b"cmd_get", b"get_hits", b"get_misses"]:
        assert name in real and name in example, name
        assert example[name].isdigit(), (name, example[name])
    assert real[b"limit_maxbytes"] == example[b"limit_maxbytes"] == b"%d" % (64 << 20)
    assert int(example[b"bytes"]) <= int(example[b"limit_maxbytes"])
