"""Review of the fault work: signal handlers on shard 0, Ctrl-C while shard
0 serves calls, SystemExit from a fire-and-forget call, close() of a running
loop, a cancelled Sharded start, a stuck plain call at shutdown, servers
after main() returned, Connections across runtimes, and a daemon runtime
caught mid-shutdown by interpreter exit."""

from __future__ import annotations

import signal
import socket
import time

from ._harness import SHUTDOWN_PROBE, Child, assert_clean_exit, describe, run_script, scenario


def seconds_after(stdout: str, label: str) -> float:
    """The number the child printed after ``label``."""
    return float(stdout.split(label, 1)[1].split()[0])


def test_signal_handler_added_on_shard_0_runs_there() -> None:
    """Fault: loop.add_signal_handler(SIGUSR1, cb) inside shardloop.run() on
    the main thread, then SIGUSR1 sent to the process, once while shard 0 is
    running Python and once while it sleeps in the Rust reactor. Expected:
    cb runs on shard 0 within a second both times."""
    body = """
    async def main():
        loop = asyncio.get_running_loop()
        fired = []
        event = asyncio.Event()

        def cb():
            fired.append(shard.id())
            event.set()

        loop.add_signal_handler(signal.SIGUSR1, cb)
        for how in ("from shard 0", "while shard 0 sleeps"):
            event.clear()
            sent = time.monotonic()
            if how == "from shard 0":
                os.kill(os.getpid(), signal.SIGUSR1)
            else:
                threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
                sent += 0.2
            try:
                await asyncio.wait_for(event.wait(), 3)
                print(how, "ran on shard", fired[-1], "after %.3f" % (time.monotonic() - sent))
            except TimeoutError:
                print(how, "not run", flush=True)
        loop.remove_signal_handler(signal.SIGUSR1)

    run2(main())
    """
    proc = run_script(scenario(body), timeout=15)
    assert_clean_exit(proc)
    for how in ("from shard 0", "while shard 0 sleeps"):
        assert f"{how} ran on shard 0 after" in proc.stdout, describe(proc)
        assert seconds_after(proc.stdout, f"{how} ran on shard 0 after") < 1.0, describe(proc)


CTRL_C_WHILE_SERVING = """
def work():
    return sum(i * i for i in range(2000))

async def pound():
    n = 0
    while True:
        try:
            await shard.submit_to(0, work)
        except BaseException as exc:
            print("shard 1 got", type(exc).__name__, flush=True)
            raise
        n += 1
        if n == 500:
            print("ready", flush=True)

async def main():
    shard.submit_to(1, pound)
    await asyncio.Event().wait()

try:
    run2(main())
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
except BaseException as exc:
    print("run() raised", type(exc).__name__, exc, flush=True)
    sys.exit(4)
print("run() returned", flush=True)
"""


def test_ctrl_c_while_shard_0_serves_plain_calls_from_shard_1() -> None:
    """Fault: SIGINT while shard 0 is busy running plain functions for shard
    1 (which calls it in a loop) and main() awaits for ever: the
    KeyboardInterrupt could land inside a served call and be sent to shard
    1 as that call's result, leaving the runtime running (hung), or come
    out of run() as CancelledError. Expected: within ~2 s the process exits
    with KeyboardInterrupt from run(), and shard 1 never gets a
    KeyboardInterrupt as a call result. A few rounds: the signal lands at a
    different point each time."""
    for _ in range(4):
        with Child(scenario(CTRL_C_WHILE_SERVING), timeout=20) as child:
            child.wait_for_line("ready")
            sent = child.signal(signal.SIGINT)
            proc = child.finish(timeout=8)
            took = time.monotonic() - sent
        assert proc.returncode == 3 and "interrupted" in proc.stdout, describe(proc)
        assert "shard 1 got KeyboardInterrupt" not in proc.stdout, describe(proc)
        assert took < 2.5, f"stopped {took:.2f}s after SIGINT\n{describe(proc)}"
        for bad in ("Fatal Python error", "panicked"):
            assert bad not in proc.stderr, describe(proc)


def test_system_exit_from_a_fire_and_forget_plain_call() -> None:
    """Fault: a plain function raising SystemExit(5) on shard 1, sent with
    submit_to and never awaited, while main() sleeps 30 s. Expected: the
    runtime stops and run() raises SystemExit(5) (exit code 5) within a
    couple of seconds."""
    body = """
    def bye():
        raise SystemExit(5)

    async def main():
        shard.submit_to(1, bye)
        await asyncio.sleep(30)

    started = time.monotonic()
    try:
        run2(main())
    except BaseException as exc:
        print("run() raised", type(exc).__name__, exc, flush=True)
        raise
    finally:
        print("run() ended after %.2f" % (time.monotonic() - started), flush=True)
    """
    proc = run_script(scenario(body), timeout=20)
    assert_clean_exit(proc, code=5)
    assert "run() raised SystemExit 5" in proc.stdout, describe(proc)
    assert seconds_after(proc.stdout, "run() ended after") < 3, describe(proc)


def test_closing_the_running_loop_is_refused() -> None:
    """Fault: asyncio.get_running_loop().close() called inside main() (and
    inside a coroutine on shard 1) could shut the runtime down under itself.
    Expected: RuntimeError("Cannot close a running event loop"), as asyncio
    gives; calls keep working afterwards and run() returns normally."""
    body = """
    def try_close():
        try:
            asyncio.get_running_loop().close()
        except RuntimeError as exc:
            return f"RuntimeError {exc}"
        except BaseException as exc:
            return f"other {type(exc).__name__} {exc}"
        return "no error"

    async def close_on_shard():
        return try_close()

    async def main():
        print("shard 0 close:", try_close(), flush=True)
        print("after", await shard.submit_to(1, sum, [1, 2]), flush=True)
        print("shard 1 close:", await shard.submit_to(1, close_on_shard), flush=True)
        print("after", await shard.submit_to(1, sum, [3, 4]), flush=True)
        print("after", await shard.submit_to(0, sum, [5, 6]), flush=True)
        return "done"

    print("run() returned", run2(main()), flush=True)
    """
    proc = run_script(scenario(body), timeout=15)
    assert_clean_exit(proc)
    refused = "RuntimeError Cannot close a running event loop"
    assert f"shard 0 close: {refused}" in proc.stdout, describe(proc)
    assert f"shard 1 close: {refused}" in proc.stdout, describe(proc)
    for line in ("after 3", "after 7", "after 11", "run() returned done"):
        assert line in proc.stdout.splitlines(), describe(proc)


def test_cancelled_sharded_start_stops_what_it_built() -> None:
    """Fault: Sharded(cls).start() cancelled (wait_for timing out after
    0.2 s) while cls.start() sleeps 5 s on shard 1 and is instant on shard
    0. Expected: TimeoutError at the caller at once, the instance already
    built on shard 0 is stopped (its stop() runs on shard 0), shard 1's
    start is cancelled there, and run() returns promptly."""
    body = """
    EVENTS = []

    class Service:
        async def start(self):
            EVENTS.append(f"start {shard.id()}")
            if shard.id() == 1:
                try:
                    await asyncio.sleep(5)
                except asyncio.CancelledError:
                    EVENTS.append("start 1 cancelled")
                    raise

        async def stop(self):
            EVENTS.append(f"stop {shard.id()}")

    async def main():
        svc = shardloop.Sharded(Service)
        began = time.monotonic()
        try:
            await asyncio.wait_for(svc.start(), 0.2)
            print("caller: no error", flush=True)
        except BaseException as exc:
            print("caller got", type(exc).__name__, flush=True)
        print("caller waited %.2f" % (time.monotonic() - began), flush=True)
        print("events", sorted(EVENTS), flush=True)

    started = time.monotonic()
    run2(main())
    print("run() took %.2f" % (time.monotonic() - started), flush=True)
    """
    proc = run_script(scenario(body), timeout=20)
    assert_clean_exit(proc)
    assert "caller got TimeoutError" in proc.stdout, describe(proc)
    assert seconds_after(proc.stdout, "caller waited") < 1.5, describe(proc)
    expected = sorted(["start 0", "start 1", "start 1 cancelled", "stop 0"])
    assert f"events {expected!r}" in proc.stdout, describe(proc)
    assert seconds_after(proc.stdout, "run() took") < 3, describe(proc)


def test_plain_call_stuck_in_sleep_at_shutdown() -> None:
    """Fault: a plain function stuck in time.sleep(30) on shard 1 (sent
    fire-and-forget) when main() returns, with shutdown_timeout=0.5: a
    plain call cannot be cancelled, and shutdown could wait for it for
    ever. Expected: run() returns within ~5 s, with a RuntimeWarning that
    says the stuck shard was left running, and the process then exits
    (interpreter exit may wait up to ~10 s for the thread to leave
    Python)."""
    body = """
    STUCK = threading.Event()

    def stuck():
        STUCK.set()
        time.sleep(30)

    async def main():
        shard.submit_to(1, stuck)
        while not STUCK.is_set():
            await asyncio.sleep(0.01)

    started = time.monotonic()
    run2(main(), shutdown_timeout=0.5)
    print("run() returned after %.2f" % (time.monotonic() - started), flush=True)
    """
    with Child(scenario(body), timeout=40) as child:
        line = child.read_line("run() returned after")
        returned = time.monotonic()
        proc = child.finish(timeout=25)
        exited = time.monotonic() - returned
    print(f"{line}; the process exited {exited:.2f} s later")
    assert_clean_exit(proc)
    assert seconds_after(line, "after") < 5, describe(proc)
    assert "RuntimeWarning" in proc.stderr and "left running" in proc.stderr, describe(proc)
    assert exited < 20, f"exited {exited:.2f}s after run() returned\n{describe(proc)}"


SERVER_AFTER_MAIN = """
SERVED = threading.Event()

async def handle(conn):
    SERVED.set()
    conn.write(b"hi\\n")
    await conn.drain()
    await conn.read(1)

async def long():
    await asyncio.sleep(2)

async def main():
    server = await shardloop.serve_connections(handle, "127.0.0.1", 0)
    print("port", server.port, flush=True)
    while not SERVED.is_set():
        await asyncio.sleep(0.01)
    shard.submit_to(1, long)
    print("main returns", flush=True)

started = time.monotonic()
run2(main(), shutdown_timeout=3)
print("run() returned after %.2f" % (time.monotonic() - started), flush=True)
"""


def test_server_stops_accepting_when_main_returns_during_a_long_drain() -> None:
    """Fault: a serve_connections server left open when main() returns,
    while a 2 s remote coroutine keeps the runtime draining
    (shutdown_timeout=3). Its accept loops are tasks that serve no call, so
    they are cancelled as the drain begins. Expected: a connection 0.5 s
    after main() returned is refused, or closed without service (no
    greeting) within a second rather than sitting in the backlog until the
    drain ends."""
    with Child(scenario(SERVER_AFTER_MAIN), timeout=20) as child:
        port = int(child.read_line("port").split()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as first:
            assert first.recv(3) == b"hi\n", child.report()
            returned = child.wait_for_line("main returns")
            time.sleep(max(0.0, returned + 0.5 - time.monotonic()))
            attempted = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as late:
                    late.settimeout(1)
                    outcome = f"accepted, then {late.recv(16)!r}"
            except ConnectionRefusedError:
                outcome = "refused"
            except ConnectionResetError:
                outcome = "reset"
            except TimeoutError:
                outcome = "accepted, then no answer"
            waited = time.monotonic() - attempted
        proc = child.finish()
    assert_clean_exit(proc)
    assert outcome in ("refused", "reset", "accepted, then b''"), (
        f"late connection: {outcome} after {waited:.2f}s\n{describe(proc)}"
    )
    assert waited < 1.0, f"late connection: {outcome} after {waited:.2f}s\n{describe(proc)}"
    # The drain did run meanwhile: the long call held run() for ~2 s.
    assert seconds_after(proc.stdout, "run() returned after") >= 1.5, describe(proc)


def test_connection_dropped_on_another_runtimes_shard() -> None:
    """Fault: two runtimes at once in two threads; a Connection made on
    runtime A's shard 0 is handed through a queue to runtime B's shard 1
    and dropped there (del, gc.collect()). Releasing it there would touch
    runtime A's shard from a thread of B. Expected: no crash, no panic
    text, both runtimes finish with their results, exit code 0."""
    body = """
    import queue, socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    PORT = listener.getsockname()[1]
    handoff = queue.Queue()
    dropped = threading.Event()
    results = {}

    async def runtime_a():
        conn = await shardloop.connect("127.0.0.1", PORT)
        handoff.put(conn)
        del conn
        while not dropped.is_set():
            await asyncio.sleep(0.01)
        return await shard.submit_to(1, sum, [1, 2])

    def drop_it():
        conn = handoff.get(timeout=10)
        kind = type(conn).__name__
        del conn
        gc.collect()
        return f"dropped a {kind} on shard {shard.id()}"

    async def runtime_b():
        try:
            return await shard.submit_to(1, drop_it)
        finally:
            dropped.set()

    def in_thread(name, coro):
        try:
            results[name] = run2(coro)
        except BaseException as exc:
            results[name] = f"raised {type(exc).__name__} {exc}"

    threads = [
        threading.Thread(target=in_thread, args=("A", runtime_a())),
        threading.Thread(target=in_thread, args=("B", runtime_b())),
    ]
    for t in threads:
        t.start()
    peer, _ = listener.accept()
    for t in threads:
        t.join(15)
        assert not t.is_alive(), "a runtime did not finish"
    gc.collect()
    print("A", results["A"], flush=True)
    print("B", results["B"], flush=True)
    peer.close()
    listener.close()
    """
    proc = run_script(scenario(body), timeout=30)
    assert_clean_exit(proc)
    assert "A 3" in proc.stdout.splitlines(), describe(proc)
    assert "B dropped a Connection on shard 1" in proc.stdout.splitlines(), describe(proc)


def test_daemon_runtime_mid_shutdown_when_the_main_thread_exits() -> None:
    """Fault: a runtime in a daemon thread is shutting down (main() has
    returned, a remote coroutine still runs within shutdown_timeout=5) when
    the main thread exits. Expected: exit code 0, no "Fatal Python error",
    no "exception not rethrown". A few rounds."""
    body = """
    IN_DRAIN = threading.Event()

    async def slow():
        await wait_for_shutdown()
        IN_DRAIN.set()
        await asyncio.sleep(3)

    async def main():
        MAIN.append(asyncio.current_task())
        shard.submit_to(1, slow)
        await asyncio.sleep(0.01)

    threading.Thread(target=lambda: run2(main(), shutdown_timeout=5), daemon=True).start()
    assert IN_DRAIN.wait(10), "the runtime never began to drain"
    print("main exits", flush=True)
    """
    for _ in range(3):
        proc = run_script(scenario(SHUTDOWN_PROBE, body), timeout=20)
        assert "main exits" in proc.stdout, describe(proc)
        assert_clean_exit(proc)
        assert "exception not rethrown" not in proc.stderr, describe(proc)


# -- Found by hostile use: these fail until fixed ---------------------------


def test_idle_poll_out_of_range_is_a_clear_value_error() -> None:
    """Fault: run(idle_poll=float("inf")) (or 1e300) panicked in Rust
    ("cannot convert float seconds to Duration", a PanicException with the
    panic text and backtrace on stderr). Expected: a ValueError naming
    idle_poll, as shutdown_timeout=-1 gives, and no panic text."""
    body = """
    async def main():
        return 1

    for value in (float("inf"), 1e300):
        coro = main()
        try:
            run2(coro, idle_poll=value)
            print("idle_poll", value, "no error", flush=True)
        except BaseException as exc:
            print("idle_poll", value, type(exc).__name__, exc, flush=True)
        finally:
            coro.close()
    """
    proc = run_script(scenario(body), timeout=15)
    assert "panicked" not in proc.stderr, describe(proc)
    for value in ("inf", "1e+300"):
        line = next(x for x in proc.stdout.splitlines() if x.startswith(f"idle_poll {value} "))
        assert line.startswith(f"idle_poll {value} ValueError"), describe(proc)
        assert "idle_poll" in line.split("ValueError", 1)[1], describe(proc)


def test_shard_threads_have_the_stack_of_python_threads() -> None:
    """Fault: shard threads ran Python on Rust's default 2 MiB stack, where
    a threading.Thread gets 8 MiB (the ulimit default): with the recursion
    limit raised, repr() of a 16000-deep nested list worked on a thread but
    killed the process on shard 1 (segmentation fault, exit -11).
    Expected: what works on a threading.Thread works on a shard."""
    body = """
    sys.setrecursionlimit(100000)

    def deep(n):
        x = None
        for _ in range(n):
            x = [x]
        try:
            return f"ok {len(repr(x))}"
        except RecursionError:  # 3.13 bounds C recursion on every thread
            return "RecursionError"

    out = []
    t = threading.Thread(target=lambda: out.append(deep(16000)))
    t.start()
    t.join()
    print("thread:", out[0], flush=True)

    async def main():
        return await shard.submit_to(1, deep, 16000)

    print("shard 1:", run2(main()), flush=True)
    """
    proc = run_script(scenario(body), timeout=20)
    assert_clean_exit(proc)
    thread = next(x for x in proc.stdout.splitlines() if x.startswith("thread:"))
    on_shard = next(x for x in proc.stdout.splitlines() if x.startswith("shard 1:"))
    assert thread.split(":")[1] == on_shard.split(":")[1], describe(proc)


def test_concurrent_sharded_starts_do_not_lose_instances() -> None:
    """Fault: two Sharded.start() calls on one service at once both
    succeeded: every shard's instance was built twice, and the first ones
    were dropped without their stop() (built [0, 0, 1, 1], stopped [0, 1]).
    Expected: the second start() raises RuntimeError (or waits for the
    first); every instance built is stopped by svc.stop()."""
    body = """
    BUILT, STOPPED = [], []

    class Service:
        async def start(self):
            BUILT.append(shard.id())
            await asyncio.sleep(0.2)

        async def stop(self):
            STOPPED.append(shard.id())

    async def main():
        svc = shardloop.Sharded(Service)
        results = await asyncio.gather(svc.start(), svc.start(), return_exceptions=True)
        print("results", [type(r).__name__ for r in results], flush=True)
        await svc.stop()
        print("built", sorted(BUILT), "stopped", sorted(STOPPED), flush=True)

    run2(main())
    """
    proc = run_script(scenario(body), timeout=15)
    assert_clean_exit(proc)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("built"))
    built, stopped = line.removeprefix("built ").split(" stopped ")
    assert built == stopped, describe(proc)


def test_handler_that_raises_before_awaiting_is_logged_and_counted() -> None:
    """Fault: a connection handler that raises when called (a plain
    function, or a coroutine function's wrapper that fails) escaped the
    server's bookkeeping: logged as "Task exception was never retrieved"
    without the shard or the client, and not counted (stats show 0
    connections, 0 failures). Expected: as for any failing handler: only
    its connection is closed, the error is logged as "handler failed on
    shard N (client ...)", and stats count the connection and the failure."""
    body = """
    import socket

    def handler(conn):
        raise ValueError("handler refused")

    def client(port):
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.settimeout(3)
            return s.recv(10)

    async def main():
        loop = asyncio.get_running_loop()
        server = await shardloop.serve_connections(handler, "127.0.0.1", 0)
        got = await loop.run_in_executor(None, client, server.port)
        print("client got", got, flush=True)
        stats = await server.stats()
        print("connections", sum(s["connections"] for s in stats), flush=True)
        print("failures", sum(s["failures"] for s in stats), flush=True)
        await server.close()

    run2(main())
    """
    proc = run_script(scenario(body), timeout=15)
    assert_clean_exit(proc)
    assert "client got b''" in proc.stdout, describe(proc)
    assert "handler failed on shard" in proc.stderr, describe(proc)
    assert "never retrieved" not in proc.stderr, describe(proc)
    assert "connections 1" in proc.stdout and "failures 1" in proc.stdout, describe(proc)
