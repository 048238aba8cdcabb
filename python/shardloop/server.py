"""Sharded listening: every shard accepts and serves its own connections.

``serve(handler, host, port)`` starts a listener on every shard. By default
each shard has its own socket bound to the same port with ``SO_REUSEPORT``,
and the kernel spreads incoming connections over them; nothing crosses shards
to accept. ``balance="round_robin"`` is Seastar's alternative: shard 0 alone
accepts and hands each connection's descriptor to the next shard in turn.
Handlers are ordinary asyncio stream handlers, ``handler(reader, writer)``,
running on the shard that owns the connection.

``serve_connections(handler, host, port)`` is the same server for handlers
of a :class:`Connection`, ``handler(conn)``: its buffers live in Rust, the
shard reads into them with the GIL released, and an awaited
``conn.read_exactly(n)`` wakes its coroutine only when all ``n`` bytes are
there. It costs far less Python per request than asyncio streams.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, cast

from . import shard
from ._loop import current_loop
from ._shardloop import Connection, ShutdownError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ConnectionHandler = Callable[[Connection], Awaitable[None]]
Balance = Literal["reuseport", "round_robin"]

logger = logging.getLogger("shardloop.server")

__all__ = [
    "Connection",
    "ConnectionHandler",
    "Handler",
    "ShardedServer",
    "serve",
    "serve_connections",
]


class _ShardState:
    """What one shard keeps of one sharded server."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.accept_task: asyncio.Task[None] | None = None
        self.connections = 0
        self.active = 0
        self.failures = 0
        self.clients: set[asyncio.Task[Any]] = set()


class ShardedServer:
    """A listener on every shard; made by :func:`serve` or
    :func:`serve_connections`."""

    def __init__(
        self,
        handler: Handler | ConnectionHandler,
        host: str,
        port: int,
        balance: Balance,
        backlog: int,
        limit: int,
        native: bool = False,
    ) -> None:
        self._handler = handler
        self._native = native
        self.host = host
        self.port = port
        self.balance: Balance = balance
        self._backlog = backlog
        self._limit = limit
        self._states: list[_ShardState | None] = [None] * shard.count()
        self._closed: asyncio.Future[None] = current_loop().create_future()

    # -- on every shard -------------------------------------------------

    def _local(self) -> _ShardState:
        state = self._states[shard.id()]
        if state is None:
            state = self._states[shard.id()] = _ShardState()
        return state

    async def _serve(
        self,
        handling: Callable[[], Awaitable[None]],
        peer: Callable[[], object],
        close: Callable[[], None],
    ) -> None:
        """Runs one connection's handler and counts it; a failure (raised by
        the call or by what it returns) is logged and closes only this
        connection."""
        state = self._local()
        state.connections += 1
        state.active += 1
        task = asyncio.current_task()
        if task is not None:
            state.clients.add(task)
        try:
            await handling()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: only its connection is affected
        except ShutdownError:
            pass  # the runtime is stopping: not this handler's failure
        except Exception:
            state.failures += 1
            logger.exception("handler failed on shard %d (client %s)", shard.id(), _peer(peer))
        finally:
            state.active -= 1
            if task is not None:
                state.clients.discard(task)
            close()

    async def _serve_streams(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        handler = cast(Handler, self._handler)
        await self._serve(
            lambda: handler(reader, writer),
            lambda: writer.get_extra_info("peername"),
            writer.close,
        )

    async def _serve_connection(self, conn: Connection) -> None:
        handler = cast(ConnectionHandler, self._handler)
        await self._serve(lambda: handler(conn), lambda: conn.peername, conn.close)

    def _listening_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on
        # sockets that say they are TCP, and accepted ones inherit this.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.balance == "reuseport":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.host, self.port))
        sock.setblocking(False)
        return sock

    async def _start_local(self) -> None:
        state = self._local()
        if self.balance == "reuseport" and not self._native:
            state.server = await asyncio.start_server(
                self._serve_streams,
                sock=self._listening_socket(),
                backlog=self._backlog,
                limit=self._limit,
            )
        elif self.balance == "reuseport" or shard.id() == 0:
            listener = self._listening_socket()
            listener.listen(self._backlog)
            targets = [shard.id()] if self.balance == "reuseport" else range(shard.count())
            state.accept_task = asyncio.create_task(self._accept(listener, targets))

    async def _accept(self, listener: socket.socket, targets: Iterable[int]) -> None:
        """Accepts on `listener` and hands each connection to the next of
        `targets` in turn."""
        loop = asyncio.get_running_loop()
        turn = itertools.cycle(targets)
        try:
            while True:
                conn, _ = await loop.sock_accept(listener)
                target = next(turn)
                if target == shard.id():
                    await self._adopt(conn.detach())
                else:
                    fd = conn.detach()
                    try:
                        shard.submit_to(target, self._adopt, fd)
                    except Exception:
                        socket.socket(fileno=fd).close()
                        raise
        finally:
            listener.close()

    async def _adopt(self, fd: int) -> None:
        """Serves an accepted connection, given by descriptor, on this shard."""
        if self._native:
            clients = self._local().clients
            task = asyncio.create_task(self._serve_connection(Connection(fd)))
            clients.add(task)
            task.add_done_callback(clients.discard)
            return
        loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        reader = asyncio.StreamReader(limit=self._limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, self._serve_streams, loop=loop)
        await loop.connect_accepted_socket(lambda: protocol, sock)

    async def _close_local(self) -> None:
        state = self._states[shard.id()]
        if state is None:
            return
        if state.server is not None:
            state.server.close()
        if state.accept_task is not None:
            state.accept_task.cancel()
        for task in list(state.clients):
            task.cancel()
        if state.server is not None:
            await state.server.wait_closed()

    def _local_stats(self) -> dict[str, int]:
        state = self._local()
        return {
            "shard": shard.id(),
            "connections": state.connections,
            "active": state.active,
            "failures": state.failures,
        }

    # -- from the shard that made it ---------------------------------------

    async def close(self) -> None:
        """Stops every listener and closes every connection."""
        if self._closed.done():
            return
        await shard.invoke_on_all(self._close_local)
        self._closed.set_result(None)

    async def serve_forever(self) -> None:
        """Waits until the server is closed."""
        await asyncio.shield(self._closed)

    async def stats(self) -> list[dict[str, int]]:
        """Per shard: connections accepted, active now, handler failures."""
        return await shard.invoke_on_all(self._local_stats)

    async def __aenter__(self) -> ShardedServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _peer(peer: Callable[[], object]) -> object:
    """The client's address for a log line, or "?" once it is gone."""
    try:
        return peer()
    except OSError:
        return "?"


def _reserve_port(host: str, port: int) -> int:
    """Fails with a clear OSError if ``port`` is taken; returns the port (a
    free one for 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(
                    exc.errno, f"cannot serve on {host}:{port}: the address is already in use"
                ) from exc
            raise
        bound: int = probe.getsockname()[1]
        return bound


async def serve(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    balance: Balance = "reuseport",
    backlog: int = 1024,
    limit: int = 2**16,
) -> ShardedServer:
    """Serves ``handler(reader, writer)`` on every shard.

    ``balance="reuseport"`` (the default) gives every shard its own listening
    socket on the port and lets the kernel spread connections;
    ``"round_robin"`` has shard 0 accept and hand connections out in turn. A
    handler that raises closes only its connection and is logged with the
    shard and the traceback. A port in use fails here, before any shard
    serves. Port 0 picks a free port (see ``server.port``).
    """
    return await _start(handler, host, port, balance, backlog, limit, native=False)


async def serve_connections(
    handler: ConnectionHandler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    balance: Balance = "reuseport",
    backlog: int = 1024,
) -> ShardedServer:
    """Serves ``handler(conn)`` on every shard, for each accepted
    :class:`Connection`; otherwise as :func:`serve`."""
    return await _start(handler, host, port, balance, backlog, 2**16, native=True)


async def _start(
    handler: Handler | ConnectionHandler,
    host: str,
    port: int,
    balance: Balance,
    backlog: int,
    limit: int,
    native: bool,
) -> ShardedServer:
    if not callable(handler):
        raise TypeError(f"the handler must be callable, not {type(handler).__name__}")
    if balance not in ("reuseport", "round_robin"):
        raise ValueError(f"balance must be 'reuseport' or 'round_robin', not {balance!r}")
    port = _reserve_port(host, port)
    server = ShardedServer(handler, host, port, balance, backlog, limit, native)
    try:
        await shard.invoke_on_all(server._start_local)
    except BaseException:
        await server.close()
        raise
    return server
