"""A sharded server under bad clients: resets mid-request, half-open
connections, clients that never read, a thousand connections at once; and
its descriptors back to where they were afterwards.

The server runs in a child process (so that its descriptors and memory can
be measured through /proc); the clients are plain blocking sockets with
timeouts in the test process.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import time
from collections.abc import Iterator

from ._harness import Child, open_fds, rss_kib, scenario

# A line protocol on shardloop.Connection:
#   "echo N\n" + N bytes  -> the N bytes back
#   "pump N\n"            -> N bytes, written 64 KiB at a time with drain()
#   "stats\n"             -> one JSON line: per-shard server stats and the
#                            largest Connection.pending seen
SERVER = """
import json

MAX_PENDING = [0]
SERVER = []

async def handle(conn):
    while True:
        try:
            line = await conn.read_until(b"\\n", 1024)
        except asyncio.IncompleteReadError:
            return
        command, _, argument = line.strip().partition(b" ")
        if command == b"echo":
            conn.write(await conn.read_exactly(int(argument)))
        elif command == b"pump":
            left = int(argument)
            chunk = b"x" * 65536
            while left > 0:
                conn.write(chunk[:left])
                left -= len(chunk)
                MAX_PENDING[0] = max(MAX_PENDING[0], conn.pending)
                await conn.drain()
        elif command == b"stats":
            stats = await SERVER[0].stats()
            report = {"shards": stats, "max_pending": MAX_PENDING[0]}
            conn.write(json.dumps(report).encode() + b"\\n")
        else:
            conn.write(b"?\\n")
        await conn.drain()

async def main():
    server = await shardloop.serve_connections(handle, "127.0.0.1", 0)
    SERVER.append(server)
    print("port", server.port, flush=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

try:
    run2(main())
except KeyboardInterrupt:
    pass
"""

TIMEOUT = 10  # seconds any one client operation may take


class Server:
    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.port = port
        self.pid = child.pid

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        sock.settimeout(TIMEOUT)
        return sock

    def echo(self, payload: bytes, sock: socket.socket | None = None) -> bytes:
        own = sock is None
        sock = sock or self.connect()
        try:
            sock.sendall(b"echo %d\n" % len(payload) + payload)
            return recv_exactly(sock, len(payload))
        finally:
            if own:
                sock.close()

    def stats(self) -> dict[str, object]:
        with self.connect() as sock:
            sock.sendall(b"stats\n")
            line = b""
            while not line.endswith(b"\n"):
                chunk = sock.recv(65536)
                assert chunk, "the server closed the stats connection"
                line += chunk
        report: dict[str, object] = json.loads(line)
        return report

    def active(self) -> int:
        """Connections being served now, not counting the one asking."""
        shards = self.stats()["shards"]
        assert isinstance(shards, list)
        return sum(s["active"] for s in shards) - 1

    def wait_until(self, what: str, condition: object, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not condition():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise AssertionError(f"the server never got to: {what}\n{self.child.report()}")
            time.sleep(0.02)

    def settled(self, baseline_fds: int) -> None:
        """Every client is gone from the server: no handler runs, and its
        descriptors are back to ``baseline_fds``."""
        self.wait_until("no connection served", lambda: self.active() == 0)
        self.wait_until(
            f"descriptors back to {baseline_fds} (now {open_fds(self.pid)})",
            lambda: open_fds(self.pid) <= baseline_fds,
        )


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def reset(sock: socket.socket) -> None:
    """Closes with SO_LINGER 0: the peer gets a RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextlib.contextmanager
def server() -> Iterator[Server]:
    with Child(scenario(SERVER), timeout=120) as child:
        port = int(child.read_line("port ").split()[1])
        child.wait_for_line("ready")
        yield Server(child, port)
        child.signal(2)  # SIGINT: the server stops
        proc = child.finish(timeout=10)
        assert "Traceback" not in proc.stderr, child.report()
        assert "panicked" not in proc.stderr, child.report()


def test_connections_reset_mid_request_and_mid_reply() -> None:
    """Fault: clients that reset their connection (SO_LINGER 0 close) in the
    middle of a request, or while the server writes a large reply.
    Expected: only those connections end; the server serves others, no
    handler is left running, and its descriptors return to the baseline."""
    with server() as srv:
        baseline = open_fds(srv.pid)
        assert srv.echo(b"warm-up") == b"warm-up"
        for i in range(100):
            sock = srv.connect()
            if i % 2:
                sock.sendall(b"echo 1000\n" + b"y" * 10)  # 990 bytes never come
            else:
                sock.sendall(b"pump 50000000\n")  # 50 MB the client never takes
                sock.recv(1000)
            reset(sock)
        assert srv.echo(b"still served") == b"still served"
        srv.settled(baseline)
        shards = srv.stats()["shards"]
        assert isinstance(shards, list)
        assert sum(s["failures"] for s in shards) == 0, shards


def test_half_open_connection_is_still_answered() -> None:
    """Fault: a client that sends its requests then shuts down its writing
    side (shutdown(SHUT_WR), half-open). Expected: the server still answers
    everything that was asked, then closes its side (the client reads EOF);
    nothing is left behind."""
    with server() as srv:
        baseline = open_fds(srv.pid)
        for _ in range(20):
            sock = srv.connect()
            sock.sendall(b"echo 3\nabcecho 2\nde")
            sock.shutdown(socket.SHUT_WR)
            assert recv_exactly(sock, 5) == b"abcde"
            assert sock.recv(10) == b"", "the server did not close its side"
            sock.close()
        srv.settled(baseline)


def test_clients_that_never_read_do_not_grow_the_server() -> None:
    """Fault: clients that ask for much more than they read (a large reply
    never read; a flood of requests whose replies are never read).
    Expected: the server's memory and each Connection's pending output stay
    bounded (drain() back-pressure), other clients are still served, and
    once those clients go, nothing of them is left."""
    with server() as srv:
        baseline = open_fds(srv.pid)
        rss_before = rss_kib(srv.pid)
        greedy = []
        for _ in range(4):
            sock = srv.connect()
            sock.sendall(b"pump 400000000\n")  # 400 MB, never read
            greedy.append(sock)
        # Request floods: send echo requests without reading any reply,
        # until the server stops taking them (bounded in bytes and time).
        for _ in range(4):
            sock = srv.connect()
            sock.setblocking(False)
            request = b"echo 65536\n" + b"z" * 65536
            rest = memoryview(request)
            sent, deadline = 0, time.monotonic() + 5
            while sent < 200 << 20 and time.monotonic() < deadline:
                # The server has stopped taking them when the socket stays
                # full for a while.
                if not select.select([], [sock], [], 0.3)[1]:
                    break
                n = sock.send(rest)
                sent += n
                rest = rest[n:] or memoryview(request)
            greedy.append(sock)
        assert srv.echo(b"others are served") == b"others are served"
        report = srv.stats()
        grown = rss_kib(srv.pid) - rss_before
        max_pending = report["max_pending"]
        assert isinstance(max_pending, int)
        assert max_pending <= 1 << 20, f"a Connection held {max_pending} bytes"
        assert grown < 100 * 1024, f"the server grew by {grown} KiB"
        for sock in greedy:
            sock.close()
        srv.settled(baseline)


def test_a_thousand_connections_at_once() -> None:
    """Fault: 1,000 connections open at the same time, each with a request
    in flight. Expected: every one is answered correctly, and once they
    close the server's descriptors are back to the baseline."""
    with server() as srv:
        baseline = open_fds(srv.pid)
        socks = []
        try:
            for _ in range(1000):
                socks.append(srv.connect())
            for i, sock in enumerate(socks):
                sock.sendall(b"echo 8\n%08d" % i)
            for i, sock in enumerate(socks):
                assert recv_exactly(sock, 8) == b"%08d" % i
            assert srv.active() == 1000
        finally:
            for sock in socks:
                sock.close()
        srv.settled(baseline)


def test_descriptors_return_to_baseline_after_mixed_abuse() -> None:
    """Fault: a mix of clean closes, resets, half-open closes and clients
    that vanish mid-request, repeated. Expected: after each round the
    server's open descriptors (/proc/<pid>/fd) are back to the baseline."""
    with server() as srv:
        baseline = open_fds(srv.pid)
        for _ in range(3):
            for i in range(60):
                sock = srv.connect()
                kind = i % 4
                if kind == 0:
                    assert srv.echo(b"ok", sock) == b"ok"
                    sock.close()
                elif kind == 1:
                    sock.sendall(b"echo 100\nabc")
                    reset(sock)
                elif kind == 2:
                    sock.sendall(b"echo 2\nhi")
                    sock.shutdown(socket.SHUT_WR)
                    assert recv_exactly(sock, 2) == b"hi"
                    sock.close()
                else:
                    sock.sendall(b"echo 100\nabc")
                    sock.close()  # a FIN in the middle of a request
            srv.settled(baseline)
