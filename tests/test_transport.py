"""A shard loop's socket transport (Rust's, behind loop.create_server,
create_connection and the streams): the same protocol code runs on stock
asyncio and on a shard loop and must see the same calls, in the same order."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import sys
import warnings
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import shardloop
from conftest import run2
from shardloop import _shardloop

Run = Callable[[Coroutine[Any, Any, Any]], Any]


class Recorder(asyncio.Protocol):
    """Records what the transport calls, and echoes what it receives
    unless told otherwise."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.calls: list[str] = []
        self.data = bytearray()
        self.transport: Any = None
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.calls.append("made")
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.calls or self.calls[-1] != "data":
            self.calls.append("data")
        self.data += data
        if self.echo:
            self.transport.write(data)

    def eof_received(self) -> bool | None:
        self.calls.append("eof")
        return None

    def pause_writing(self) -> None:
        self.calls.append("pause")

    def resume_writing(self) -> None:
        self.calls.append("resume")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.calls.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)


P = TypeVar("P")


def keeping(protocol: Callable[[], P]) -> tuple[list[P], Callable[[], P]]:
    """A protocol factory, and the list of the protocols it made."""
    made: list[P] = []

    def factory() -> P:
        made.append(protocol())
        return made[-1]

    return made, factory


async def serve(protocol: Callable[[], asyncio.BaseProtocol]) -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def received(made: list[Recorder]) -> None:
    """Waits until the first protocol `made` has received data."""
    while not made or not made[0].data:
        await asyncio.sleep(0.001)


async def talking(
    first: bytes,
) -> tuple[asyncio.Server, asyncio.StreamReader, asyncio.StreamWriter, Recorder]:
    """A server of a Recorder that does not echo, and a client that sent it
    `first`, once the Recorder has it."""
    made, factory = keeping(lambda: Recorder(echo=False))
    server, port = await serve(factory)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(first)
    await received(made)
    return server, reader, writer, made[0]


def test_a_shard_loop_gives_its_own_transport() -> None:
    async def main() -> tuple[type, Any, Any, bool]:
        made, factory = keeping(Recorder)

        server, port = await serve(factory)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        await reader.readexactly(1)
        transport = made[0].transport
        info = (transport.get_extra_info("sockname"), transport.get_extra_info("peername"))
        sock = transport.get_extra_info("socket")
        nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        kinds = (type(transport), type(writer.transport))
        writer.close()
        await made[0].lost
        server.close()
        await server.wait_closed()
        return kinds, info, writer.get_extra_info("sockname"), nodelay

    kinds, (sockname, peername), client_name, nodelay = run2(main())
    assert kinds == (_shardloop.Transport, _shardloop.Transport)
    assert sockname[0] == "127.0.0.1"
    assert peername == client_name
    assert nodelay


def test_the_protocol_hears_in_asyncio_s_order(run_on: Run) -> None:
    async def main() -> tuple[list[str], bytes, BaseException | None, bool]:
        made, factory = keeping(Recorder)

        server, port = await serve(factory)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(20):
            writer.write(b"line %d\n" % i)
        echoed = b"".join([await reader.readline() for _ in range(20)])
        writer.write_eof()
        assert await reader.read() == b""  # the server closes after EOF
        exc = await made[0].lost
        closing = made[0].transport.is_closing()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return made[0].calls, echoed, exc, closing

    calls, echoed, exc, closing = run_on(main())
    assert calls == ["made", "data", "eof", "lost"]
    assert echoed == b"".join(b"line %d\n" % i for i in range(20))
    assert exc is None
    assert closing


def test_a_client_that_does_not_read_pauses_the_writer(run_on: Run) -> None:
    """Flow control: past the high water mark the protocol is paused; once
    the client reads, it is resumed, and every byte arrives in order."""

    payload = bytes(range(256)) * 40_000  # ~10 MB: more than the socket buffers

    async def main() -> tuple[list[str], bool, int, tuple[int, int]]:
        server, reader, writer, protocol = await talking(b"go")
        transport = protocol.transport
        transport.write(payload)
        paused_at = transport.get_write_buffer_size()
        await asyncio.sleep(0.05)  # the client reads nothing meanwhile
        received = await reader.readexactly(len(payload))
        for _ in range(100):
            if "resume" in protocol.calls:
                break
            await asyncio.sleep(0.01)
        limits = transport.get_write_buffer_limits()
        transport.close()
        await protocol.lost
        writer.close()
        server.close()
        await server.wait_closed()
        return protocol.calls, received == payload, paused_at, limits

    calls, intact, paused_at, limits = run_on(main())
    assert calls[:4] == ["made", "data", "pause", "resume"]
    assert intact
    assert paused_at > 64 * 1024
    assert limits == (16 * 1024, 64 * 1024)


def test_paused_reading_holds_the_data_back(run_on: Run) -> None:
    async def main() -> tuple[bytes, bytes, bool, bool]:
        made: list[Recorder] = []

        class Pausing(Recorder):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                transport.pause_reading()  # type: ignore[attr-defined]

        def factory() -> Recorder:
            made.append(Pausing(echo=False))
            return made[-1]

        server, port = await serve(factory)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"first ")
        await writer.drain()
        await asyncio.sleep(0.05)
        held = bytes(made[0].data)
        was_reading = made[0].transport.is_reading()
        made[0].transport.resume_reading()
        writer.write(b"second")
        while len(made[0].data) < 12:
            await asyncio.sleep(0.001)
        writer.close()
        await made[0].lost
        server.close()
        await server.wait_closed()
        return held, bytes(made[0].data), was_reading, made[0].transport.is_reading()

    held, data, was_reading, reading_after = run_on(main())
    assert held == b""
    assert data == b"first second"
    assert not was_reading
    assert not reading_after  # closed


class Buffered(asyncio.BufferedProtocol):
    """Takes what arrives through a small buffer of its own."""

    def __init__(self) -> None:
        self.buffer = bytearray(7)
        self.data = bytearray()
        self.sizes: list[int] = []
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.sizes.append(nbytes)
        self.data += self.buffer[:nbytes]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(None)


def test_a_buffered_protocol_gets_everything_through_its_buffer(run_on: Run) -> None:
    payload = b"".join(b"%05d" % i for i in range(2000))

    async def main() -> tuple[bytes, int]:
        made, factory = keeping(Buffered)

        server, port = await serve(factory)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        writer.close()
        await made[0].lost
        server.close()
        await server.wait_closed()
        return bytes(made[0].data), max(made[0].sizes)

    data, largest = run_on(main())
    assert data == payload
    assert largest <= 7


def test_a_protocol_that_raises_is_reported_and_its_connection_closed(run_on: Run) -> None:
    async def main() -> tuple[str, str, str, bool]:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: reported.append(context))
        made: list[Recorder] = []

        class Failing(Recorder):
            def data_received(self, data: bytes) -> None:
                raise ValueError("bad request")

        def factory() -> Recorder:
            made.append(Failing())
            return made[-1]

        server, port = await serve(factory)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        exc = await made[0].lost
        closed = await reader.read() == b""
        writer.close()
        server.close()
        await server.wait_closed()
        return reported[0]["message"], repr(reported[0]["exception"]), repr(exc), closed

    message, reported, lost_with, closed = run_on(main())
    assert message == "Fatal error: protocol.data_received() call failed."
    assert reported == lost_with == "ValueError('bad request')"
    assert closed


def test_bad_writes_get_asyncio_s_errors(run_on: Run) -> None:
    async def main() -> list[str]:
        server, reader, writer, protocol = await talking(b"x")
        transport = protocol.transport
        seen = []
        for bad in (
            lambda: transport.write("text"),
            lambda: transport.set_write_buffer_limits(high=1, low=2),
        ):
            try:
                bad()
            except (TypeError, ValueError) as exc:
                seen.append(f"{type(exc).__name__}: {exc}")
        transport.write(bytearray(b"ab"))
        transport.write(memoryview(b"cd"))
        transport.writelines([b"e", bytearray(b"f"), memoryview(b"g")])
        transport.write(b"")
        transport.write_eof()
        try:
            transport.write(b"late")
        except RuntimeError as exc:
            seen.append(f"RuntimeError: {exc}")
        seen.append((await reader.read()).decode())
        writer.close()
        transport.close()
        await protocol.lost
        server.close()
        await server.wait_closed()
        return seen

    assert run_on(main()) == [
        "TypeError: data argument must be a bytes-like object, not 'str'",
        "ValueError: high (1) must be >= low (2) must be >= 0",
        "RuntimeError: Cannot call write() after write_eof()",
        "abcdefg",
    ]


def test_abort_drops_what_is_buffered_and_writes_after_are_dropped(
    run_on: Run, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> tuple[BaseException | None, list[str]]:
        server, reader, writer, protocol = await talking(b"x")
        transport = protocol.transport
        transport.write(b"y" * 1_000_000)
        transport.abort()
        exc = await protocol.lost
        for _ in range(6):
            transport.write(b"after")  # dropped; from the fifth on, logged
        await reader.read()
        writer.close()
        server.close()
        await server.wait_closed()
        return exc, protocol.calls

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        exc, calls = run_on(main())
    assert exc is None
    assert calls[-1] == "lost"
    assert "socket.send() raised exception." in caplog.text


def test_unix_sockets_get_the_transport_too() -> None:
    async def main(path: str) -> tuple[bytes, type]:
        made, factory = keeping(Recorder)

        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(factory, path)
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"over unix")
        echoed = await reader.readexactly(9)
        writer.close()
        await made[0].lost
        server.close()
        await server.wait_closed()
        return echoed, type(made[0].transport)

    import tempfile

    with tempfile.TemporaryDirectory() as where:
        echoed, kind = run2(main(f"{where}/socket"))
    assert echoed == b"over unix"
    assert kind is _shardloop.Transport


def test_a_transport_left_open_closes_with_its_runtime() -> None:
    """As asyncio's: a ResourceWarning, and its socket closed (the peer
    sees the end of the stream)."""

    peer: list[socket.socket] = []

    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        loop = asyncio.get_running_loop()
        # A protocol that keeps its transport, as nearly all do.
        transport, _ = await loop.create_connection(Recorder, "127.0.0.1", port)
        accepted, _ = listener.accept()
        listener.close()
        peer.append(accepted)
        del transport

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run2(main())
        gc.collect()
    assert any(
        issubclass(w.category, ResourceWarning) and "unclosed transport" in str(w.message)
        for w in caught
    )
    peer[0].settimeout(5)
    assert peer[0].recv(10) == b""
    peer[0].close()


def test_system_exit_in_data_received_stops_the_runtime() -> None:
    class Exiting(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            raise SystemExit(3)

    async def main() -> None:
        _server, port = await serve(Exiting)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        await asyncio.sleep(10)

    with pytest.raises(SystemExit) as raised:
        run2(main())
    assert raised.value.code == 3


@pytest.mark.skipif(sys.version_info < (3, 13), reason="Server.close_clients is new in 3.13")
def test_a_server_closes_its_clients() -> None:
    async def main() -> list[BaseException | None]:
        made, factory = keeping(Recorder)

        server, port = await serve(factory)
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        while len(made) < 3:
            await asyncio.sleep(0.001)
        server.close()
        server.close_clients()  # type: ignore[attr-defined]
        await asyncio.wait_for(server.wait_closed(), 5)
        for _, writer in clients:
            writer.close()
        return [await p.lost for p in made]

    assert run2(main()) == [None, None, None]


def test_many_connections_at_once_on_every_shard() -> None:
    async def one_shard() -> int:
        server, port = await serve(Recorder)

        async def talk(i: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"%d " % i * 100)
            reply = await reader.readexactly(len(b"%d " % i * 100))
            writer.close()
            await writer.wait_closed()
            return reply

        replies = await asyncio.gather(*(talk(i) for i in range(50)))
        server.close()
        await server.wait_closed()
        return sum(reply == b"%d " % i * 100 for i, reply in enumerate(replies))

    async def main() -> list[int]:
        return await shardloop.shard.invoke_on_all(one_shard)

    assert run2(main()) == [50, 50]


def test_any_thread_may_ask_whether_a_transport_is_closing() -> None:
    """A StreamWriter collected on another thread asks its transport
    is_closing() (and a log handler may ask get_extra_info)."""

    async def main() -> tuple[bool, bool, Any, str]:
        loop = asyncio.get_running_loop()
        made, factory = keeping(Recorder)

        server, port = await serve(factory)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        transport = writer.transport
        open_there = await loop.run_in_executor(None, transport.is_closing)
        peer = await loop.run_in_executor(None, transport.get_extra_info, "peername")
        try:
            await loop.run_in_executor(None, transport.write, b"x")
        except RuntimeError as exc:
            misuse = str(exc)
        writer.close()
        closing_there = await loop.run_in_executor(None, transport.is_closing)
        await made[0].lost
        server.close()
        await server.wait_closed()
        return open_there, closing_there, peer, misuse

    open_there, closing_there, peer, misuse = run2(main())
    assert (open_there, closing_there) == (False, True)
    assert peer[0] == "127.0.0.1"
    assert misuse == "a Transport is used only on its own shard (shard 0)"


def native_heap() -> int:
    """Bytes the C heap has in use (what Rust allocates, not Python's
    object arenas)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


@pytest.mark.parametrize("how", ["close", "abort"])
def test_a_transport_closed_while_its_reader_waits_leaves_nothing_behind(how: str) -> None:
    """The reader task waiting on the socket ends with the connection (it
    held the transport's state, a 16 KiB buffer each, for good)."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        server, port = await serve(asyncio.Protocol)

        async def one() -> None:
            transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
            await asyncio.sleep(0.001)  # its reader now waits for the socket
            getattr(transport, how)()
            await asyncio.sleep(0.001)

        for _ in range(50):
            await one()
        before = native_heap()
        for _ in range(300):
            await one()
        await asyncio.sleep(0.05)
        grown = native_heap() - before
        server.close()
        await server.wait_closed()
        return grown

    grown = run2(main())
    assert grown < 1_500_000  # 300 leaked transports would hold 4.8 MB


async def accepted(
    protocol: Callable[[], asyncio.Protocol],
) -> tuple[asyncio.Server, socket.socket, Any]:
    """A server of `protocol` (which keeps its transport as `transport`)
    and a non-blocking client socket with small buffers (a slow peer),
    once the server's protocol has its transport."""
    loop = asyncio.get_running_loop()
    made, factory = keeping(protocol)
    server = await loop.create_server(factory, "127.0.0.1", 0)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await loop.sock_connect(client, server.sockets[0].getsockname())
    while not made or getattr(made[0], "transport", None) is None:
        await asyncio.sleep(0.001)
    return server, client, made[0]


def test_resume_writing_comes_at_the_low_water_mark(run_on: Run) -> None:
    """Not once everything is sent: a slow reader's writer is resumed while
    the buffer still holds up to the low water mark."""

    class Watching(asyncio.Protocol):
        def __init__(self) -> None:
            self.marks: list[tuple[str, int]] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport

        def pause_writing(self) -> None:
            self.marks.append(("pause", self.transport.get_write_buffer_size()))

        def resume_writing(self) -> None:
            self.marks.append(("resume", self.transport.get_write_buffer_size()))

    async def main() -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        server, client, protocol = await accepted(Watching)
        transport = protocol.transport
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        transport.set_write_buffer_limits(high=200_000, low=100_000)
        transport.write(b"x" * 2_000_000)
        received = 0
        while received < 2_000_000:
            received += len(await loop.sock_recv(client, 3000))
            await asyncio.sleep(0)
        transport.close()
        client.close()
        server.close()
        return protocol.marks  # type: ignore[no-any-return]

    marks = run_on(main())
    assert [what for what, _ in marks] == ["pause", "resume"]
    assert marks[0][1] > 200_000
    assert 0 < marks[1][1] <= 100_000


def test_a_writer_that_never_quite_catches_up_stays_bounded(run_on: Run) -> None:
    """A protocol that writes until paused, to a slow peer that also talks
    back: the bytes already sent do not pile up in the buffer."""

    class Streamer(asyncio.Protocol):
        paused = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 8192
            )
            self.fill()

        def fill(self) -> None:
            while not self.paused:
                self.transport.write(b"z" * 8192)

        def pause_writing(self) -> None:
            self.paused = True

        def resume_writing(self) -> None:
            self.paused = False
            self.fill()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        server, client, _ = await accepted(Streamer)
        before = native_heap()
        until = loop.time() + 1.5
        while loop.time() < until:
            await loop.sock_recv(client, 16384)
            await loop.sock_sendall(client, b".")
            await asyncio.sleep(0.0002)
        grown = native_heap() - before
        client.close()
        server.close()
        return grown

    assert run_on(main()) < 8_000_000  # it grew by ~64 MB a second


def test_abort_frees_a_large_pending_write() -> None:
    """The writer task waiting for the socket ends with the connection (it
    held the transport's state and its buffer for good)."""

    async def main() -> int:
        before = native_heap()
        for _ in range(10):
            server, client, protocol = await accepted(lambda: Recorder(echo=False))
            # The peer never reads: most of the write stays in the buffer.
            protocol.transport.write(b"w" * 5_000_000)
            await asyncio.sleep(0.01)
            protocol.transport.abort()
            await protocol.lost
            client.close()
            server.close()
        await asyncio.sleep(0.05)
        return native_heap() - before

    assert run2(main()) < 10_000_000  # ten leaked buffers would hold ~50 MB


def test_sendfile_goes_through_the_transport(run_on: Run, tmp_path: Any) -> None:
    content = bytes(range(256)) * 1000
    path = tmp_path / "file"
    path.write_bytes(content)

    async def main() -> tuple[int, bytes, int]:
        loop = asyncio.get_running_loop()
        server, reader, writer, protocol = await talking(b"x")
        with path.open("rb") as file:
            sent = await loop.sendfile(protocol.transport, file, offset=1000, count=200_000)
            position = file.tell()
        received = await reader.readexactly(sent)
        protocol.transport.close()
        writer.close()
        server.close()
        return sent, received, position

    sent, received, position = run_on(main())
    assert sent == 200_000
    assert received == content[1000:201_000]
    assert position == 201_000


def test_a_buffered_protocol_may_give_any_writable_buffer(run_on: Run) -> None:
    """As socket.recv_into takes it: an array of ints or a ctypes array
    is written as bytes."""
    import array
    import ctypes

    buffers: list[Any] = [array.array("i", bytes(16)), (ctypes.c_char * 16)()]

    async def main(buffer: Any) -> bytes:
        got = bytearray()
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        class Into(asyncio.BufferedProtocol):
            def get_buffer(self, sizehint: int) -> Any:
                return buffer

            def buffer_updated(self, nbytes: int) -> None:
                got.extend(memoryview(buffer).cast("B")[:nbytes])

            def connection_lost(self, exc: BaseException | None) -> None:
                lost.set_result(None)

        server, port = await serve(Into)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello world")
        writer.close()
        await lost
        server.close()
        return bytes(got)

    assert [run_on(main(b)) for b in buffers] == [b"hello world", b"hello world"]


def test_protocol_callbacks_run_in_the_context_the_transport_was_made_in(run_on: Run) -> None:
    """A copy of it, kept for the connection, as asyncio's reader runs them."""
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def main() -> tuple[list[str], str]:
        seen: list[str] = []
        replies: asyncio.Queue[None] = asyncio.Queue()

        class Reading(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                seen.append(var.get())
                var.set("set in data_received")
                replies.put_nowait(None)

        server, port = await serve(Recorder)
        var.set("where the connection was made")
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(Reading, "127.0.0.1", port)
        var.set("the task's, later")
        for _ in range(2):
            transport.write(b"x")
            await replies.get()
        transport.close()
        server.close()
        await server.wait_closed()
        return seen, var.get()

    seen, after = run_on(main())
    assert seen == ["where the connection was made", "set in data_received"]
    assert after == "the task's, later"


def test_a_reset_after_reading_was_paused_reaches_the_protocol(run_on: Run) -> None:
    """The peer sends and then resets while the protocol has paused reading:
    once it resumes, connection_lost gets the reset, as on asyncio."""

    async def main() -> str:
        made: list[Recorder] = []

        class PausingAtOnce(Recorder):
            def data_received(self, data: bytes) -> None:
                super().data_received(data)
                self.transport.pause_reading()

        def factory() -> Recorder:
            made.append(PausingAtOnce(echo=False))
            return made[-1]

        server, port = await serve(factory)
        peer = socket.create_connection(("127.0.0.1", port))
        peer.sendall(b"r" * 300_000)
        await received(made)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # a reset
        await asyncio.sleep(0.1)
        for _ in range(100):
            made[0].transport.resume_reading()
            await asyncio.sleep(0.005)
            if made[0].lost.done():
                break
        exc = await asyncio.wait_for(made[0].lost, 5)
        server.close()
        return type(exc).__name__

    assert run_on(main()) in ("ConnectionResetError", "NoneType")


def test_sendfile_leaves_a_stream_writer_s_flow_control_as_it_found_it(
    run_on: Run, tmp_path: Any
) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"f" * 3_000_000)

    async def main() -> tuple[list[str], int]:
        loop = asyncio.get_running_loop()
        reported: list[str] = []
        loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
        got = 0
        done = loop.create_future()

        async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal got
            while chunk := await reader.read(65536):
                got += len(chunk)
                await asyncio.sleep(0.001)
            writer.close()
            done.set_result(None)

        server = await asyncio.start_server(slow_reader, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        with path.open("rb") as file:
            await loop.sendfile(writer.transport, file)
        writer.write(b"after")
        await writer.drain()
        writer.close()
        await done
        server.close()
        return reported, got

    reported, got = run_on(main())
    assert reported == []
    assert got == 3_000_005
