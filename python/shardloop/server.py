"""Sharded listening: every shard accepts and serves its own connections.

``serve(handler, host, port)`` starts a listener on every shard. By default
each shard has its own socket bound to the same port with ``SO_REUSEPORT``,
and the kernel spreads incoming connections over them; nothing crosses shards
to accept. ``balance="round_robin"`` is Seastar's alternative: shard 0 alone
accepts and hands each connection's descriptor to the next shard in turn.
Handlers are ordinary asyncio stream handlers, ``handler(reader, writer)``,
running on the shard that owns the connection.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from . import shard
from ._loop import current_loop

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Balance = Literal["reuseport", "round_robin"]

logger = logging.getLogger("shardloop.server")

__all__ = ["ShardedServer", "serve"]


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
    """A listener on every shard; made by :func:`serve`."""

    def __init__(
        self, handler: Handler, host: str, port: int, balance: Balance, backlog: int, limit: int
    ) -> None:
        self._handler = handler
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

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        state = self._local()
        state.connections += 1
        state.active += 1
        task = asyncio.current_task()
        if task is not None:
            state.clients.add(task)
        try:
            await self._handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: only its connection is affected
        except Exception:
            state.failures += 1
            peer = writer.get_extra_info("peername")
            logger.exception("handler failed on shard %d (client %s)", shard.id(), peer)
        finally:
            state.active -= 1
            if task is not None:
                state.clients.discard(task)
            writer.close()

    def _listening_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.balance == "reuseport":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.host, self.port))
        sock.setblocking(False)
        return sock

    async def _start_local(self) -> None:
        state = self._local()
        if self.balance == "reuseport":
            state.server = await asyncio.start_server(
                self._serve_connection,
                sock=self._listening_socket(),
                backlog=self._backlog,
                limit=self._limit,
            )
        elif shard.id() == 0:
            listener = self._listening_socket()
            listener.listen(self._backlog)
            state.accept_task = asyncio.create_task(self._accept_round_robin(listener))

    async def _accept_round_robin(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        targets = itertools.cycle(range(shard.count()))
        try:
            while True:
                conn, _ = await loop.sock_accept(listener)
                target = next(targets)
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
        loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        reader = asyncio.StreamReader(limit=self._limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, self._serve_connection, loop=loop)
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
    if balance not in ("reuseport", "round_robin"):
        raise ValueError(f"balance must be 'reuseport' or 'round_robin', not {balance!r}")
    port = _reserve_port(host, port)
    server = ShardedServer(handler, host, port, balance, backlog, limit)
    try:
        await shard.invoke_on_all(server._start_local)
    except BaseException:
        await server.close()
        raise
    return server
