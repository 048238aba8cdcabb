"""The echo service (RFC 862) on every shard: each connection gets back what
it sends, served by the shard that accepted it.

    python examples/echo_server.py --port 7007 [--shards N] [--balance round_robin]
                                   [--api streams]
"""

from __future__ import annotations

import argparse
import asyncio

import shardloop
from shardloop import shard


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def echo_connection(conn: shardloop.Connection) -> None:
    while data := await conn.read():
        conn.write(data)
        await conn.drain()


async def main(args: argparse.Namespace) -> None:
    if args.api == "streams":
        server = await shardloop.serve(echo, args.host, args.port, balance=args.balance)
    else:
        server = await shardloop.serve_connections(
            echo_connection, args.host, args.port, balance=args.balance
        )
    print(f"echo server on {args.host}:{server.port}, {shard.count()} shards", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7007)
    parser.add_argument("--shards", type=int, default=None, help="default: one per core")
    parser.add_argument("--balance", choices=("reuseport", "round_robin"), default="reuseport")
    parser.add_argument(
        "--api",
        choices=("connection", "streams"),
        default="connection",
        help="shardloop.Connection (buffers in Rust) or asyncio streams",
    )
    parser.add_argument(
        "--idle-poll",
        type=float,
        default=200e-6,
        help="seconds an idle shard polls before it sleeps (0: sleep at once)",
    )
    arguments = parser.parse_args()
    try:
        shardloop.run(main(arguments), shards=arguments.shards, idle_poll=arguments.idle_poll)
    except KeyboardInterrupt:
        pass
