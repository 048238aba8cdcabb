"""The memcached-protocol example: the protocol's own conformance tool, a
real client, and bad input."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymemcache.client.base import Client
from shardloop._load import drive, free_port

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "memcached_server.py"


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    """The example on 2 shards, on loopback, for this module's tests."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--port", str(port), "--shards", "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "memcached protocol on" in proc.stdout.readline()
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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
    lines = reply.split(b"\r\n")
    assert lines[0] == b"ERROR"
    assert lines[1].startswith(b"CLIENT_ERROR")  # not a number
    assert lines[2].startswith(b"CLIENT_ERROR")  # key too long
    assert lines[3] == b"CLIENT_ERROR bad data chunk"
    assert b"SERVER_ERROR object too large for cache" in reply
    assert reply.endswith(b"STORED\r\nVALUE k 0 2\r\nok\r\nEND\r\n")


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
