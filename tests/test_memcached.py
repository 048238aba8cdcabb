"""The memcached-protocol example: the protocol's own conformance tool, a
real client, bad input, and its memory limit. (test_memcached_diff.py
compares its replies with the real memcached's.)"""

from __future__ import annotations

import contextlib
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loadgen import drive, free_port
from pymemcache.client.base import Client

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "memcached_server.py"
MB = 1 << 20


@pytest.fixture
def test_limit() -> float:
    """These tests drive real servers: a longer limit (tests/conftest.py)."""
    return 240


@contextlib.contextmanager
def example(*options: str) -> Iterator[subprocess.Popen[str]]:
    """The example on 2 shards, on loopback, with ``options``; its port is
    ``proc.port``."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--port", str(port), "--shards", "2", *options],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "memcached protocol on" in proc.stdout.readline()
        proc.port = port  # type: ignore[attr-defined]
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    """The example on 2 shards, on loopback, for this module's tests."""
    with example() as proc:
        yield proc.port  # type: ignore[attr-defined]


def test_memccapable_ascii_passes(server: int) -> None:
    tool = shutil.which("memccapable")
    assert tool, "memccapable is missing: apt-get install libmemcached-tools (.ci/run does)"
    result = subprocess.run(
        [tool, "-h", "127.0.0.1", "-p", str(server), "-a"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All tests passed" in result.stdout


def test_pymemcache_across_shards(server: int) -> None:
    client = Client(("127.0.0.1", server), connect_timeout=5, timeout=5, default_noreply=False)
    try:
        keys = [f"key-{i}" for i in range(50)]  # spread over both shards
        for i, key in enumerate(keys):
            assert client.set(key, str(i).encode())
        assert client.get_many(keys) == {k: str(i).encode() for i, k in enumerate(keys)}
        assert client.incr("key-3", 10) == 13
        assert client.decr("key-3", 20) == 0
        value, cas = client.gets("key-4")
        assert value == b"4"
        assert client.cas("key-4", b"new", cas) is True
        assert client.cas("key-4", b"newer", cas) is False
        assert client.add("key-4", b"x") is False
        assert client.replace("missing", b"x") is False
        assert client.append("key-5", b"!") and client.get("key-5") == b"5!"
        assert client.prepend("key-5", b"#") and client.get("key-5") == b"#5!"
        assert client.delete("key-6") and client.get("key-6") is None
        assert client.touch("key-7", 1)
        client.set("short", b"v", expire=1)
        time.sleep(2.1)
        assert client.get("short") is None and client.get("key-7") is None
        assert client.flush_all()
        assert client.get_many(keys) == {}
        stats = client.stats()
        assert stats[b"threads"] == 2
    finally:
        client.close()


def raw(port: int, request: bytes, wait: float = 0.3) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        time.sleep(wait)
        sock.settimeout(0.5)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def reply_line(sock: socket.socket) -> bytes:
    """One reply line (the socket has a timeout)."""
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(1)
        assert chunk, f"the connection closed after {line!r}"
        line += chunk
    return line


def test_bad_commands_get_protocol_errors_and_the_connection_stays_usable(server: int) -> None:
    reply = raw(
        server,
        b"bogus\r\n"
        b"set k 0 0 notanumber\r\n"
        b"set " + b"k" * 300 + b" 0 0 1\r\nx\r\n"
        b"set k 0 0 3\r\nabcdef\r\n"
        b"incr k x\r\n"
        b"set big 0 0 2000000\r\n" + b"z" * 2_000_000 + b"\r\n"
        b"set k 0 0 2\r\nok\r\n"
        b"get k\r\n",
    )
    # memcached's replies, byte for byte: a refused command line reads no
    # data, so its data line is a command of its own ("x": ERROR); a data
    # block is read whole before its CRLF is checked, and what follows
    # ("f") is a command again; a value too large is read and dropped.
    assert reply == (
        b"ERROR\r\n"
        b"CLIENT_ERROR bad command line format\r\n"
        b"CLIENT_ERROR bad command line format\r\n"
        b"ERROR\r\n"
        b"CLIENT_ERROR bad data chunk\r\n"
        b"ERROR\r\n"
        b"CLIENT_ERROR invalid numeric delta argument\r\n"
        b"SERVER_ERROR object too large for cache\r\n"
        b"STORED\r\nVALUE k 0 2\r\nok\r\nEND\r\n"
    )


@pytest.mark.parametrize("count", [b"1e23", b"4294967295", b"2147483648", b"-1", b"x"])
def test_a_byte_count_that_does_not_fit_is_answered_at_once(server: int, count: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        for name in (b"set", b"add", b"replace", b"append", b"prepend"):
            sock.sendall(b"%s k 0 0 %s\r\n" % (name, count))
            assert reply_line(sock) == b"CLIENT_ERROR bad command line format\r\n"
        sock.sendall(b"cas k 0 0 %s 1\r\n" % count)
        assert reply_line(sock) == b"CLIENT_ERROR bad command line format\r\n"


def test_overflowing_numbers_are_client_errors(server: int) -> None:
    huge = b"99999999999999999999"
    reply = raw(
        server,
        b"set n 0 0 1\r\n1\r\n"
        b"touch n %s\r\nflush_all %s\r\nincr n %s\r\ndecr n 18446744073709551616\r\n"
        b"set n %s 0 1\r\n1\r\nset n 0 %s 1\r\n1\r\nget n\r\n" % ((huge,) * 5),
    )
    assert reply == (
        b"STORED\r\n"
        b"CLIENT_ERROR invalid exptime argument\r\n"
        b"CLIENT_ERROR invalid exptime argument\r\n"
        b"CLIENT_ERROR invalid numeric delta argument\r\n"
        b"CLIENT_ERROR invalid numeric delta argument\r\n"
        b"CLIENT_ERROR bad command line format\r\nERROR\r\n"
        b"CLIENT_ERROR bad command line format\r\nERROR\r\n"
        b"VALUE n 0 1\r\n1\r\nEND\r\n"
    )
    assert raw(server, b"version\r\n").startswith(b"VERSION ")  # the server lives on


def test_long_keys_are_client_errors_in_every_command(server: int) -> None:
    key = b"k" * 251
    commands = [
        b"get %s", b"gets %s", b"gat 0 %s", b"gats 0 %s", b"delete %s", b"incr %s 1",
        b"decr %s 1", b"touch %s 0", b"set %s 0 0 1", b"add %s 0 0 1", b"replace %s 0 0 1",
        b"append %s 0 0 1", b"prepend %s 0 0 1", b"cas %s 0 0 1 1",
    ]  # fmt: skip
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        for command in commands:
            sock.sendall(command % key + b"\r\n")
            assert reply_line(sock) == b"CLIENT_ERROR bad command line format\r\n", command


def test_multigets_as_long_as_memcached_takes_are_served(server: int) -> None:
    client = Client(("127.0.0.1", server), connect_timeout=5, timeout=5, default_noreply=False)
    try:
        for count in (100, 5000):  # 100 keys of 24 bytes; then a line of 125 KB
            keys = [f"multiget:{i:015d}" for i in range(count)]
            assert len(keys[0]) == 24
            client.set_many({key: key.encode() for key in keys[::7]})
            assert client.get_many(keys) == {key: key.encode() for key in keys[::7]}
    finally:
        client.close()


def test_a_client_leaving_mid_request_costs_only_its_connection(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.sendall(b"set half 0 0 100\r\nonly part of it")
    assert raw(server, b"version\r\n").startswith(b"VERSION ")


def test_the_load_generator_speaks_memcached(server: int) -> None:
    report = drive("127.0.0.1", server, "memcached", 8, 0.5, size=100, keys=50, progress=False)
    assert report["errors"] == 0
    assert report["requests"] > 100
    # Its sets were stored: one of its keys holds its 100-byte value.
    reply = b""
    for key in range(50):
        reply = raw(server, b"get key:%d\r\n" % key)
        if reply != b"END\r\n":
            break
    assert reply == b"VALUE key:%d 0 100\r\n%s\r\nEND\r\n" % (key, b"v" * 100)


# The memory limit: the example started with -m 8 (8 MiB over its 2 shards).


@pytest.fixture(scope="module")
def small() -> Iterator[subprocess.Popen[str]]:
    with example("-m", "8") as proc:
        yield proc


def rss(pid: int) -> int:
    """The process's resident memory, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_the_memory_limit_evicts_the_least_recently_used(
    small: subprocess.Popen[str],
) -> None:
    port = small.port  # type: ignore[attr-defined]
    client = Client(("127.0.0.1", port), connect_timeout=5, timeout=5, default_noreply=False)
    try:
        for i in range(400):  # 40 MB of values through an 8 MiB store
            assert client.set(f"fill:{i}", b"f" * 100_000)
            if i % 10 == 0:  # kept recently used
                assert client.get("hot") == b"h" or client.set("hot", b"h")
        stats = client.stats()
        assert stats[b"limit_maxbytes"] == 8 * MB
        assert 0 < stats[b"bytes"] <= 8 * MB
        assert stats[b"evictions"] > 0
        assert stats[b"curr_items"] < 400
        assert client.get("hot") == b"h"
        assert client.get("fill:0") is None and client.get("fill:399") == b"f" * 100_000
    finally:
        client.close()


def test_clients_stalled_mid_value_hold_no_memory_beyond_the_limit(
    small: subprocess.Popen[str],
) -> None:
    port = small.port  # type: ignore[attr-defined]
    before = rss(small.pid)
    stalled = []
    try:
        # 100 clients each send 900 KB of a 1 MB value, then stall. A value
        # being received holds its room: 8 fit in 8 MiB, the others are
        # refused at once and their bytes dropped as they come.
        for i in range(100):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            stalled.append(sock)
            sock.sendall(b"set stalled:%d 0 0 1000000\r\n" % i + b"s" * 900_000)
        refused = 0
        deadline = time.monotonic() + 15
        waiting = set(stalled)
        with selectors.DefaultSelector() as selector:
            for sock in waiting:
                selector.register(sock, selectors.EVENT_READ)
            while refused < 92 and time.monotonic() < deadline:
                for key, _ in selector.select(deadline - time.monotonic()):
                    sock = key.fileobj  # type: ignore[assignment]
                    assert reply_line(sock) == b"SERVER_ERROR out of memory storing object\r\n"
                    selector.unregister(sock)
                    refused += 1
        assert refused >= 92, f"only {refused} of 100 stalled values were refused"
        time.sleep(0.5)  # the 8 others read what they were sent
        grown = rss(small.pid) - before
        assert grown < (8 + 24) * MB, f"resident memory grew by {grown / MB:.0f} MiB"
    finally:
        for sock in stalled:
            sock.close()
    assert raw(port, b"version\r\n").startswith(b"VERSION ")
