"""Sharded servers: serving, balancing, and bad clients and handlers."""

from __future__ import annotations

import ast
import asyncio
import logging
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import shardloop
from conftest import run2
from shardloop import shard

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def talk(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    reply = await reader.readexactly(len(payload))
    writer.close()
    return reply


@pytest.mark.parametrize("balance", ["reuseport", "round_robin"])
def test_every_shard_serves_connections(balance: str) -> None:
    async def main() -> tuple[list[bytes], list[int]]:
        server = await shardloop.serve(echo, balance=balance)  # type: ignore[arg-type]
        async with server:
            replies = await asyncio.gather(*(talk(server.port, b"ping %d" % i) for i in range(40)))
            stats = await server.stats()
        return list(replies), [s["connections"] for s in stats]

    replies, per_shard = run2(main())
    assert replies == [b"ping %d" % i for i in range(40)]
    assert sum(per_shard) == 40
    if balance == "round_robin":
        assert per_shard == [20, 20]


@pytest.mark.parametrize("balance", ["reuseport", "round_robin"])
def test_stream_connections_have_nagle_off(balance: str) -> None:
    """Replies written one after another must not wait for the peer's
    delayed ACK (40 ms) before they leave."""

    async def nodelay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        sock = writer.get_extra_info("socket")
        writer.write(b"%d" % sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        await writer.drain()

    async def main() -> bytes:
        server = await shardloop.serve(nodelay, balance=balance)  # type: ignore[arg-type]
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"?")
            reply = await reader.read(10)
            writer.close()
            return reply

    assert run2(main()) == b"1"


def test_port_in_use_fails_before_any_shard_serves() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main() -> None:
            with pytest.raises(OSError, match=f"127.0.0.1:{port}.*already in use"):
                await shardloop.serve(echo, "127.0.0.1", port)

        run2(main())


def test_a_failing_handler_closes_only_its_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def picky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readexactly(4)
        if data == b"bad!":
            raise ValueError("refusing bad input")
        writer.write(data)
        await writer.drain()

    async def main() -> tuple[bytes, bytes, int]:
        server = await shardloop.serve(picky)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"bad!")
            closed = await reader.read(10)
            good = await talk(server.port, b"good")
            failures = sum(s["failures"] for s in await server.stats())
        return closed, good, failures

    with caplog.at_level(logging.ERROR, logger="shardloop.server"):
        closed, good, failures = run2(main())
    assert (closed, good, failures) == (b"", b"good", 1)
    record = next(r for r in caplog.records if "handler failed on shard" in r.getMessage())
    assert record.exc_info is not None and "refusing bad input" in str(record.exc_info[1])


@pytest.mark.parametrize("api", ["connection", "streams"])
def test_lookup_server_answers_across_shards_and_survives_half_requests(api: str) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import lookup_server
    finally:
        sys.path.remove(str(EXAMPLES))

    async def main() -> tuple[list[bytes], list[dict[str, int]]]:
        server = await lookup_server.start("127.0.0.1", 0, 1000, "reuseport", api)
        async with server:
            # A client that sends half a request and goes away costs nothing
            # but its own connection.
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"\x00\x00")
            await writer.drain()
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            values = []
            for key in (1, 2, 999, 5000):
                writer.write(struct.pack("!I", key))
                (length,) = struct.unpack("!I", await reader.readexactly(4))
                values.append(await reader.readexactly(length))
            writer.close()
            counters = await shard.invoke_on_all(lookup_server.counters)
        return values, counters

    values, counters = run2(main())
    assert values == [b"value-00000001", b"value-00000002", b"value-00000999", b""]
    assert sum(c["requests"] for c in counters) == 4
    assert sum(c["cross_shard"] for c in counters) >= 1


def test_lookup_server_answers_pipelined_requests_in_order() -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import lookup_server
    finally:
        sys.path.remove(str(EXAMPLES))
    keys = [7, 2, 999, 4, 5000, 1, 8, 3, 6, 0]  # both shards' ids, and a miss

    async def main() -> tuple[list[bytes], int]:
        server = await lookup_server.start("127.0.0.1", 0, 1000, "reuseport")
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            request = b"".join(struct.pack("!I", key) for key in keys)
            writer.write(request[:21])  # whole requests and the start of one
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(request[21:])
            values = []
            for _ in keys:
                (length,) = struct.unpack("!I", await reader.readexactly(4))
                values.append(await reader.readexactly(length))
            writer.close()
            counters = await shard.invoke_on_all(lookup_server.counters)
        return values, sum(c["requests"] for c in counters)

    values, requests = run2(main())
    assert values == [b"value-%08d" % key if key < 1000 else b"" for key in keys]
    assert requests == len(keys)


def test_lookup_demo_runs_end_to_end() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "lookup_server.py"),
            "--demo",
            "--seconds",
            "1",
            "--connections",
            "8",
            "--shards",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "requests/s" in out and "p99" in out and "cross-shard calls" in out
    assert "errors 0" in out


def argparse_options(source: str) -> list[str]:
    """The option strings (``--port``, ``-m``, ...) of every
    ``add_argument`` call in a script's `source`."""
    return [
        arg.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value[:1] == "-"
    ]


# The examples that are programs with a command line.
SCRIPTS = sorted(path.name for path in EXAMPLES.glob("*.py") if "argparse" in path.read_text())


def test_the_examples_with_a_command_line_are_found() -> None:
    expected = {"demo.py", "echo_server.py", "lookup_server.py", "memcached_server.py"}
    assert expected <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_examples_have_help(name: str) -> None:
    options = argparse_options((EXAMPLES / name).read_text())
    assert options, f"{name} defines no option"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:"), proc.stdout
    for option in options:
        named = re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", proc.stdout)
        assert named, f"{name} --help does not name {option}:\n{proc.stdout}"
