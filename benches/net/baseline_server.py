"""The echo and lookup servers written for one event loop with asyncio's
own API, for comparison with the shardloop versions on `Connection`: stock
asyncio, uvloop, or one shard of shardloop (its loop's transports), one
process (or several sharing the port with SO_REUSEPORT, each with the whole
table). `--api streams` serves through `asyncio.start_server`,
`--api protocol` through `loop.create_server` and a Protocol, which is what
most frameworks build on.

    python benches/net/baseline_server.py --loop uvloop --protocol lookup --port 7100
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct

KEYS = 100_000


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


TABLE = {key: f"value-{key:08d}".encode() for key in range(KEYS)}


async def lookup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """As the shardloop example on Connection: every whole request already
    buffered is answered, and the answers go out in one write."""
    one = struct.Struct("!I")
    partial = b""  # the start of a request cut by the end of a read
    try:
        while data := await reader.read(65536):
            if partial:
                data = partial + data
            whole = len(data) - len(data) % 4
            partial = data[whole:]
            if whole == 4:  # one request, as a client that waits for each answer sends
                (key,) = one.unpack(data[:4])
                value = TABLE.get(key, b"")
                writer.write(one.pack(len(value)) + value)
            else:
                keys = struct.unpack(f"!{whole // 4}I", data[:whole])
                values = [TABLE.get(key, b"") for key in keys]
                writer.write(b"".join(one.pack(len(value)) + value for value in values))
            await writer.drain()
    finally:
        writer.close()


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class LookupProtocol(asyncio.Protocol):
    """The lookup server's answers, as `lookup` gives them."""

    one = struct.Struct("!I")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.partial = b""

    def data_received(self, data: bytes) -> None:
        if self.partial:
            data = self.partial + data
        whole = len(data) - len(data) % 4
        self.partial = data[whole:]
        one = self.one
        if whole == 4:
            (key,) = one.unpack(data[:4])
            value = TABLE.get(key, b"")
            self.transport.write(one.pack(len(value)) + value)
        elif whole:
            keys = struct.unpack(f"!{whole // 4}I", data[:whole])
            values = [TABLE.get(key, b"") for key in keys]
            self.transport.write(b"".join(one.pack(len(value)) + value for value in values))


async def main(args: argparse.Namespace) -> None:
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on
    # sockets that say they are TCP (uvloop does it for every TCP socket).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", args.port))
    if args.api == "protocol":
        factory = EchoProtocol if args.protocol == "echo" else LookupProtocol
        server = await asyncio.get_running_loop().create_server(factory, sock=sock, backlog=1024)
    else:
        handler = echo if args.protocol == "echo" else lookup
        server = await asyncio.start_server(handler, sock=sock, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loop", choices=("asyncio", "uvloop", "shardloop"), default="asyncio")
    parser.add_argument("--api", choices=("streams", "protocol"), default="streams")
    parser.add_argument("--protocol", choices=("echo", "lookup"), default="lookup")
    parser.add_argument("--port", type=int, required=True)
    arguments = parser.parse_args()
    if arguments.loop == "uvloop":
        import uvloop

        uvloop.run(main(arguments))
    elif arguments.loop == "shardloop":
        import shardloop

        # One shard, sleeping at once when idle: its CPU time is its work.
        shardloop.run(main(arguments), shards=1, idle_poll=0)
    else:
        asyncio.run(main(arguments))
