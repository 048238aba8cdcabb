"""shardloop.Connection: reads awaited from Rust's buffer, writes sent at once,
and what bad peers and bad calls get."""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable

import pytest
import shardloop
from conftest import run2
from loadgen import drive, free_port
from shardloop import shard

Handler = Callable[[shardloop.Connection], Awaitable[None]]


async def with_server(
    handler: Handler, client: Callable[[int], Awaitable[object]], balance: str = "reuseport"
) -> object:
    server = await shardloop.serve_connections(handler, balance=balance)  # type: ignore[arg-type]
    async with server:
        return await asyncio.wait_for(client(server.port), 30)


async def echo(conn: shardloop.Connection) -> None:
    while data := await conn.read():
        conn.write(data)
        await conn.drain()


@pytest.mark.parametrize("balance", ["reuseport", "round_robin"])
def test_echo_on_every_shard(balance: str) -> None:
    async def talk(port: int, payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        reply = await reader.readexactly(len(payload))
        writer.close()
        return reply

    async def client(port: int) -> list[bytes]:
        return list(await asyncio.gather(*(talk(port, b"ping %d" % i) for i in range(30))))

    replies = run2(with_server(echo, client, balance))
    assert replies == [b"ping %d" % i for i in range(30)]


def test_read_exactly_read_until_and_read() -> None:
    async def handler(conn: shardloop.Connection) -> None:
        head = await conn.read_exactly(3)
        line = await conn.read_until(b"\r\n")
        rest = await conn.read(100)
        conn.write(b"|".join([head, line, rest]))

    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for piece in (b"a", b"bcline", b" one\r", b"\ntail"):  # split across reads
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        reply = await reader.read(100)
        writer.close()
        return reply

    assert run2(with_server(handler, client)) == b"abc|line one\r\n|tail"


def test_large_writes_are_buffered_and_drained() -> None:
    payload = bytes(range(256)) * 16384  # 4 MiB: more than the socket takes at once

    async def handler(conn: shardloop.Connection) -> None:
        await conn.read_exactly(1)
        conn.write(payload)
        assert conn.pending > 0
        await conn.drain()
        assert conn.pending <= 64 * 1024

    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"!")
        await asyncio.sleep(0.2)  # let the server's socket fill before reading
        data = await reader.readexactly(len(payload))
        writer.close()
        return data

    assert run2(with_server(handler, client)) == payload


def test_eof_mid_read_raises_incomplete_read_with_the_partial_bytes() -> None:
    seen: list[tuple[bytes, int | None, bytes, bool]] = []

    async def handler(conn: shardloop.Connection) -> None:
        try:
            await conn.read_exactly(10)
        except asyncio.IncompleteReadError as exc:
            seen.append((exc.partial, exc.expected, await conn.read(), conn.at_eof()))

    async def client(port: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"abc")
        writer.close()
        for _ in range(200):
            if seen:
                return
            await asyncio.sleep(0.01)

    run2(with_server(handler, client))
    assert seen == [(b"abc", 10, b"", True)]


def test_a_separator_past_the_limit_raises_limit_overrun() -> None:
    async def handler(conn: shardloop.Connection) -> None:
        with pytest.raises(asyncio.LimitOverrunError):
            await conn.read_until(b"\n", limit=8)
        conn.write(b"refused")

    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"a line that is much too long\n")
        reply = await reader.read(100)
        writer.close()
        return reply

    assert run2(with_server(handler, client)) == b"refused"


def test_bad_calls_get_clear_errors() -> None:
    async def handler(conn: shardloop.Connection) -> None:
        with pytest.raises(ValueError, match="separator"):
            conn.read_until(b"")
        with pytest.raises(ValueError, match="max"):
            conn.read(0)
        first = asyncio.ensure_future(conn.read_exactly(4))
        await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="already waiting"):
            await conn.read_exactly(4)
        first.cancel()
        conn.write(b"")
        drained = conn.drain()
        await drained
        with pytest.raises(RuntimeError, match="awaited already"):
            await drained
        conn.close()
        assert conn.closed
        with pytest.raises(ConnectionAbortedError):
            conn.write(b"late")
        with pytest.raises(ConnectionAbortedError):
            await conn.read()

    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        reply = await reader.read(100)  # b"" once the server closes
        writer.close()
        return reply

    assert run2(with_server(handler, client)) == b""


def test_a_cancelled_read_loses_no_data() -> None:
    async def handler(conn: shardloop.Connection) -> None:
        waiting = asyncio.ensure_future(conn.read_exactly(6))
        await asyncio.sleep(0.05)
        conn.write(b"go")  # the client sends 3 bytes, then 3 more later
        await asyncio.sleep(0.05)
        waiting.cancel()
        conn.write(b"!")
        data = await conn.read_exactly(6)
        conn.write(data)

    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readexactly(2) == b"go"
        writer.write(b"abc")
        assert await reader.readexactly(1) == b"!"
        writer.write(b"def")
        reply = await reader.readexactly(6)
        writer.close()
        return reply

    assert run2(with_server(handler, client)) == b"abcdef"


def test_a_failing_handler_closes_only_its_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def picky(conn: shardloop.Connection) -> None:
        data = await conn.read_exactly(4)
        if data == b"bad!":
            raise ValueError("refusing bad input")
        conn.write(data)

    async def client(port: int) -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"bad!")
        closed = await reader.read(10)
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
        writer2.write(b"good")
        good = await reader2.readexactly(4)
        writer.close()
        writer2.close()
        return closed, good

    with caplog.at_level(logging.ERROR, logger="shardloop.server"):
        assert run2(with_server(picky, client)) == (b"", b"good")
    record = next(r for r in caplog.records if "handler failed on shard" in r.getMessage())
    assert record.exc_info is not None and "refusing bad input" in str(record.exc_info[1])


def test_a_connection_is_made_only_on_a_shard() -> None:
    with socket.socket() as sock, pytest.raises(RuntimeError, match=r"shardloop\.run"):
        shardloop.Connection(sock.fileno())


def test_the_load_generator_drives_a_server_and_counts() -> None:
    async def lookup(conn: shardloop.Connection) -> None:
        while True:
            key = await conn.read_exactly(4)
            value = b"v" * (key[-1] % 7)
            conn.write(len(value).to_bytes(4, "big") + value)

    async def client(port: int) -> dict[str, object]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, lambda: drive("127.0.0.1", port, "lookup", 4, 0.3, progress=False)
        )

    report = run2(with_server(lookup, client))
    assert isinstance(report, dict)
    assert report["errors"] == 0 and int(report["requests"]) > 100
    assert float(report["p50_us"]) <= float(report["p99_us"])
    with pytest.raises(ValueError, match="protocol"):
        drive("127.0.0.1", 1, "gopher", progress=False)
    with pytest.raises(ConnectionRefusedError):
        drive("127.0.0.1", free_port(), "echo", 1, 0.1, progress=False)


def test_the_load_generator_reports_no_latency_when_nothing_was_answered() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def close_each() -> None:
            for _ in range(2):
                listener.accept()[0].close()

        closer = threading.Thread(target=close_each)
        closer.start()
        report = drive("127.0.0.1", listener.getsockname()[1], "echo", 2, 30, progress=False)
        closer.join()
    assert report["requests"] == 0 and report["errors"] == 2
    assert report["p50_us"] is None and report["p999_us"] is None
    assert report["seconds"] < 30, "the run ends once no connection is left"


def test_shards_see_their_own_connections() -> None:
    async def whoami(conn: shardloop.Connection) -> None:
        await conn.read_exactly(1)
        conn.write(bytes([shard.id()]))

    async def client(port: int) -> set[int]:
        async def one() -> int:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"?")
            (me,) = await reader.readexactly(1)
            writer.close()
            return me

        return set(await asyncio.gather(*(one() for _ in range(8))))

    assert run2(with_server(whoami, client, "round_robin")) == {0, 1}


def test_a_connection_is_used_on_its_shard_and_released_there() -> None:
    def adopt(fd: int) -> shardloop.Connection:
        return shardloop.Connection(fd)

    def turn() -> None:
        """Runs Python on the shard. (On free-threaded CPython an object
        released by another thread is freed by its own thread the next time
        that one runs Python.)"""

    async def main() -> bytes:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            peer = socket.create_connection(listener.getsockname())
            accepted, _ = listener.accept()
        with peer:
            conn = await shard.submit_to(1, adopt, accepted.detach())
            with pytest.raises(RuntimeError, match="used only on its own shard"):
                conn.write(b"from the wrong shard")
            del conn  # the last reference goes on shard 0: shard 1 closes it
            peer.settimeout(0.05)
            for _ in range(200):
                await shard.submit_to(1, turn)
                try:
                    return peer.recv(10)
                except TimeoutError:
                    continue
            raise AssertionError("the connection was not closed")

    assert run2(main()) == b""


def test_a_client_leaving_mid_response_costs_only_its_connection() -> None:
    outcomes: list[str] = []

    async def flood(conn: shardloop.Connection) -> None:
        await conn.read_exactly(1)
        try:
            for _ in range(256):  # 64 MiB: far more than the sockets hold
                conn.write(bytes(256 * 1024))
                await conn.drain()
        except ConnectionError as exc:
            outcomes.append(type(exc).__name__)
            raise

    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"!")
        await reader.readexactly(1024)
        writer.transport.abort()  # gone mid-response
        for _ in range(500):
            if outcomes:
                break
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"!")
        data = await reader.readexactly(1024)  # a new client is still served
        writer.transport.abort()
        return data

    assert run2(with_server(flood, client)) == bytes(1024)
    assert outcomes and outcomes[0] in ("BrokenPipeError", "ConnectionResetError")


def test_connect_opens_a_connection_of_this_shard() -> None:
    async def client(port: int) -> tuple[bytes, bytes]:
        async def from_shard_1() -> bytes:
            conn = await shardloop.connect("127.0.0.1", port)
            conn.write(b"hello from shard 1")
            reply = await conn.read_exactly(18)
            conn.close()
            return reply

        here = await shardloop.connect("localhost", port)
        here.write(b"ping")
        local = await here.read_exactly(4)
        here.close()
        return local, await shard.submit_to(1, from_shard_1)

    assert run2(with_server(echo, client)) == (b"ping", b"hello from shard 1")

    async def refused() -> None:
        with pytest.raises(ConnectionRefusedError):
            await shardloop.connect("127.0.0.1", free_port())

    run2(refused())


def test_write_takes_any_bytes_like_object() -> None:
    async def handler(conn: shardloop.Connection) -> None:
        await conn.read_exactly(1)
        conn.write(b"a")
        conn.write(bytearray(b"b"))
        conn.write(memoryview(b"xcx")[1:2])
        conn.write(b"")
        with pytest.raises(TypeError):
            conn.write("text")  # type: ignore[arg-type]
        conn.write(b"d")
        conn.write(array.array("H", [0x6665]))  # items wider than a byte: b"ef"

    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"!")
        data = await reader.readexactly(6)
        writer.close()
        return data

    assert run2(with_server(handler, client)) == b"abcd" + array.array("H", [0x6665]).tobytes()


def test_what_is_written_just_before_the_loop_stops_still_goes_out() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    loop = shardloop.new_event_loop(2)

    def write_and_stop() -> None:
        conn = shardloop.Connection(accepted.detach())
        conn.write(b"last words")
        conn.close()
        loop.stop()  # no further turn of the loop follows

    try:
        with peer:
            loop.call_soon(write_and_stop)
            loop.run_forever()
            # The loop is stopped, not closed, and does not run again here.
            peer.settimeout(10)
            received = b""
            while chunk := peer.recv(100):
                received += chunk
    finally:
        loop.close()
    assert received == b"last words"


def test_closed_connections_leave_no_descriptor_behind() -> None:
    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def client(port: int) -> tuple[int, int]:
        async def one(i: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x%d" % i)
            await reader.read(10)
            writer.close()
            await writer.wait_closed()

        await one(0)
        await asyncio.sleep(0.1)
        before = descriptors()
        for _ in range(5):
            await asyncio.gather(*(one(i) for i in range(40)))
        for _ in range(100):  # the shards close their ends as they see EOF
            if descriptors() <= before:
                break
            await asyncio.sleep(0.02)
        return before, descriptors()

    before, after = run2(with_server(echo, client))
    assert after <= before


def test_a_descriptor_that_is_not_a_stream_socket_is_refused_and_left_open() -> None:
    async def main() -> None:
        read_end, write_end = os.pipe()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for fd in (read_end, udp.fileno(), -1):
                with pytest.raises(ValueError, match="descriptor"):
                    shardloop.Connection(fd)
            os.write(write_end, b"still open")  # the caller still owns it
            assert os.read(read_end, 10) == b"still open"
        finally:
            os.close(read_end)
            os.close(write_end)
            udp.close()

    run2(main())
