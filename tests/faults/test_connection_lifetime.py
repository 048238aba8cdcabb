"""Connection: use after its runtime, and one reader beside one writer."""

from __future__ import annotations

from ._harness import assert_clean_exit, describe, run_script, scenario

# A listening socket of the child, and a client Connection to it made on
# shard 0 of a runtime that has ended.
LEFT_OVER = """
import socket

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
PORT = listener.getsockname()[1]
KEPT = {}

async def open_connection():
    KEPT["conn"] = await shardloop.connect("127.0.0.1", PORT)

run2(open_connection())
peer, _ = listener.accept()
peer.settimeout(5)
conn = KEPT["conn"]

def attempt(name, fn):
    started = time.monotonic()
    try:
        result = fn()
        print(name, "no error", repr(result)[:60], flush=True)
    except RuntimeError as exc:
        print(name, "RuntimeError", exc, flush=True)
    except BaseException as exc:
        print(name, "other", type(exc).__name__, exc, flush=True)
    print(name, "took %.2f" % (time.monotonic() - started), flush=True)
"""


def took(stdout: str, name: str) -> float:
    return float(stdout.split(f"{name} took")[1].split()[0])


def test_write_after_the_runtime_raises() -> None:
    """Fault: conn.write after run() returned silently kept the bytes
    pending for ever. Expected: a clear RuntimeError, at once."""
    body = """
    attempt("write", lambda: conn.write(b"late"))
    attempt("drain", lambda: asyncio.run(asyncio.wait_for(conn.drain(), 2)))
    """
    proc = run_script(scenario(LEFT_OVER, body), timeout=15)
    assert_clean_exit(proc)
    assert "write RuntimeError" in proc.stdout, describe(proc)
    assert "drain RuntimeError" in proc.stdout, describe(proc)
    assert took(proc.stdout, "write") < 1 and took(proc.stdout, "drain") < 1, describe(proc)


def test_old_connection_read_in_a_later_runtime_raises() -> None:
    """Fault: a Connection of an ended runtime, read inside a later run(),
    hung although data had arrived. Expected: a clear RuntimeError at once
    (not a hang), and the later runtime keeps working."""
    body = """
    peer.sendall(b"hello")

    async def later():
        for name, make in (
            ("read_exactly", lambda: conn.read_exactly(5)),
            ("read", lambda: conn.read(5)),
            ("read_until", lambda: conn.read_until(b"o")),
        ):
            started = time.monotonic()
            try:
                data = await asyncio.wait_for(make(), 3)
                print(name, "later: no error", data, flush=True)
            except RuntimeError as exc:
                print(name, "later: RuntimeError", exc, flush=True)
            except BaseException as exc:
                print(name, "later: other", type(exc).__name__, exc, flush=True)
            print(name, "later took %.2f" % (time.monotonic() - started), flush=True)
        return await shard.submit_to(1, sum, [1, 2])

    print("later result", run2(later()), flush=True)
    """
    proc = run_script(scenario(LEFT_OVER, body), timeout=30)
    assert_clean_exit(proc)
    for name in ("read_exactly", "read", "read_until"):
        assert f"{name} later: RuntimeError" in proc.stdout, describe(proc)
        seconds = float(proc.stdout.split(f"{name} later took")[1].split()[0])
        assert seconds < 1, describe(proc)
    assert "later result 3" in proc.stdout, describe(proc)


def test_old_connection_outside_any_runtime_raises() -> None:
    """Fault: a Connection of an ended runtime read off any shard.
    Expected: a clear RuntimeError, and close() still works."""
    body = """
    attempt("read", lambda: conn.read(5))
    attempt("close", conn.close)
    attempt("closed", lambda: conn.closed)
    """
    proc = run_script(scenario(LEFT_OVER, body), timeout=15)
    assert_clean_exit(proc)
    assert "read RuntimeError" in proc.stdout, describe(proc)
    assert "close no error" in proc.stdout and "closed no error True" in proc.stdout


DUPLEX = """
import socket

async def pair():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    accepting = loop.create_task(loop.sock_accept(listener))
    conn = await shardloop.connect("127.0.0.1", listener.getsockname()[1])
    peer, _ = await accepting
    listener.close()
    peer.setblocking(False)
    return conn, peer
"""


def test_one_reader_and_one_drain_waiter_at_a_time() -> None:
    """Fault: Connection was not full duplex: one task awaiting
    conn.read_exactly() while another wrote and awaited conn.drain() failed
    with "another task is already waiting on this connection". Expected:
    one reader and one drain waiter at the same time work, like asyncio
    streams."""
    body = """
    async def main():
        conn, peer = await pair()
        loop = asyncio.get_running_loop()
        reader = asyncio.ensure_future(conn.read_exactly(4))
        await asyncio.sleep(0)  # the reader waits
        big = b"x" * (4 << 20)  # more than the socket takes at once
        conn.write(big)

        async def peer_side():
            got = 0
            while got < len(big):
                got += len(await loop.sock_recv(peer, 1 << 20))
            await loop.sock_sendall(peer, b"pong")

        pumping = asyncio.ensure_future(peer_side())
        try:
            await asyncio.wait_for(conn.drain(), 5)
            print("drain ok", flush=True)
        except BaseException as exc:
            print("drain raised", type(exc).__name__, exc, flush=True)
        print("read", await asyncio.wait_for(reader, 5), flush=True)
        await asyncio.wait_for(pumping, 5)

        # And the other way round: the drain waits first, then a read.
        conn.write(big)
        draining = asyncio.ensure_future(conn.drain())
        await asyncio.sleep(0)
        reading = asyncio.ensure_future(conn.read_exactly(4))
        pumping = asyncio.ensure_future(peer_side())
        try:
            await asyncio.wait_for(asyncio.gather(draining, reading, pumping), 5)
            print("both ways ok", reading.result(), flush=True)
        except BaseException as exc:
            print("both ways raised", type(exc).__name__, exc, flush=True)
        conn.close()
        peer.close()

    run2(main())
    """
    proc = run_script(scenario(DUPLEX, body), timeout=20)
    assert_clean_exit(proc)
    assert "drain ok" in proc.stdout, describe(proc)
    assert "read b'pong'" in proc.stdout, describe(proc)
    assert "both ways ok b'pong'" in proc.stdout, describe(proc)


def test_two_concurrent_readers_still_raise() -> None:
    """Fault: two tasks reading one Connection at once. Expected: the
    second gets RuntimeError (as before), the first still gets its data."""
    body = """
    async def main():
        conn, peer = await pair()
        first = asyncio.ensure_future(conn.read_exactly(3))
        await asyncio.sleep(0)
        try:
            await asyncio.wait_for(conn.read_exactly(3), 2)
            print("second reader: no error", flush=True)
        except RuntimeError as exc:
            print("second reader: RuntimeError", exc, flush=True)
        except BaseException as exc:
            print("second reader: other", type(exc).__name__, exc, flush=True)
        peer.send(b"abc")
        print("first", await asyncio.wait_for(first, 5), flush=True)
        conn.close()
        peer.close()

    run2(main())
    """
    proc = run_script(scenario(DUPLEX, body), timeout=20)
    assert_clean_exit(proc)
    assert "second reader: RuntimeError" in proc.stdout, describe(proc)
    assert "first b'abc'" in proc.stdout, describe(proc)


def test_bad_arguments_get_clear_errors() -> None:
    """Fault: read_exactly(-1) and read(-5) raised OverflowError ("can't
    convert negative int to unsigned"), read_until("\\n") "Can't extract
    `str` to `Vec`", and write("text") spoke of memoryview. Expected: a
    ValueError naming the argument for a negative size, a TypeError saying
    that text must be bytes; the connection still works afterwards."""
    body = """
    async def main():
        conn, peer = await pair()
        for label, attempt in (
            ("read_exactly(-1)", lambda: conn.read_exactly(-1)),
            ("read(-5)", lambda: conn.read(-5)),
            ("read(0)", lambda: conn.read(0)),
            ("read_until(limit=-1)", lambda: conn.read_until(b"\\n", -1)),
            ("read_until(str)", lambda: conn.read_until("\\n")),
            ("write(str)", lambda: conn.write("text")),
        ):
            try:
                attempt()
                print(label, "accepted", flush=True)
            except Exception as exc:
                print(label, type(exc).__name__, exc, flush=True)
        conn.write(b"ok\\n")
        await asyncio.get_running_loop().sock_sendall(peer, b"fine\\n")
        print("still works", await conn.read_until(b"\\n"), flush=True)
        conn.close()
        peer.close()

    run2(main())
    """
    proc = run_script(scenario(DUPLEX, body), timeout=20)
    assert_clean_exit(proc)
    out = proc.stdout
    assert "read_exactly(-1) ValueError n must be at least 0, not -1" in out, describe(proc)
    assert "read(-5) ValueError max must be at least 1, not -5" in out, describe(proc)
    assert "read(0) ValueError max must be at least 1, not 0" in out, describe(proc)
    assert "read_until(limit=-1) ValueError limit must be at least 0" in out, describe(proc)
    assert "read_until(str) TypeError the separator must be bytes, not str" in out, describe(proc)
    assert "write(str) TypeError write() takes bytes" in out, describe(proc)
    assert "still works b'fine\\n'" in out, describe(proc)
