"""Client connections: :func:`connect` opens a TCP connection from the
current shard as a :class:`Connection` (the same class servers made with
``serve_connections`` hand their handlers)."""

from __future__ import annotations

import socket

from ._loop import current_loop
from ._shardloop import Connection

__all__ = ["Connection", "connect"]


async def connect(host: str, port: int) -> Connection:
    """Connects to ``host:port`` (each address ``getaddrinfo`` gives, in
    turn) and returns the connection, which belongs to this shard. Raises the
    last address's ``OSError`` if none accepts."""
    loop = current_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    failure: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        return Connection(sock.detach())
    raise failure or OSError(f"no address for {host}:{port}")
