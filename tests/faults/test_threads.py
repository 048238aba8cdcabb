"""Runtimes and threads: run() on other threads, in daemon threads, twice in
a row, two at once, and nested."""

from __future__ import annotations

import time

from ._harness import assert_clean_exit, describe, run_script, scenario

DAEMON_BODY = """
busy = threading.Event()

async def spin():
    while True:
        busy.set()
        await {call}

threading.Thread(target=lambda: {runner}(spin()), daemon=True).start()
assert busy.wait(10), "the runtime in the thread never started"
print("main exits", flush=True)
"""

# The abort depends on what the daemon thread does at the moment the
# interpreter finalizes: a few rounds make a pass on the faulty code
# unlikely.
ROUNDS = 4


def test_run_busy_in_a_daemon_thread_when_the_main_thread_exits() -> None:
    """Fault: shardloop.run() busy in a daemon thread while the main thread
    exits aborted the process ("FATAL: exception not rethrown", exit -6).
    Expected: exit code 0, as asyncio.run in the same place."""
    body = DAEMON_BODY.format(call="shard.submit_to(1, sum, [1, 2])", runner="run2")
    for _ in range(ROUNDS):
        proc = run_script(scenario(body), timeout=20)
        assert "main exits" in proc.stdout, describe(proc)
        assert_clean_exit(proc)


def test_asyncio_run_busy_in_a_daemon_thread_exits_cleanly() -> None:
    """Reference for the test above: the stock asyncio.run busy in a daemon
    thread lets the process exit with 0."""
    body = DAEMON_BODY.format(call="asyncio.sleep(0)", runner="asyncio.run")
    for _ in range(ROUNDS):
        assert_clean_exit(run_script(scenario(body), timeout=20))


# A runtime in a daemon thread whose shard 1 runs Python for `seconds` while
# the main thread exits, the interpreter waiting `wait` s between notices.
BUSY_AT_EXIT = """
import shardloop._loop
shardloop._loop._EXIT_WAIT = {wait}
started = threading.Event()

def burn(seconds):
    started.set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass

async def main():
    await shard.submit_to(1, burn, {seconds})

threading.Thread(target=lambda: run2(main()), daemon=True).start()
assert started.wait(10), "shard 1 never started"
{then}
print("main exits", flush=True)
"""


def test_a_shard_in_python_past_the_exit_wait_does_not_abort_the_process() -> None:
    """Fault: a shard still running Python code 10 s after the main thread
    exited (a long plain call in a daemon thread's runtime) aborted the
    process ("FATAL: exception not rethrown", exit -6, or a segfault):
    finalization ended the thread inside Rust frames (free-threaded: a
    segfault). Expected: exit code 0; the exit waits until the shard leaves
    Python."""
    body = BUSY_AT_EXIT.format(wait=0.5, seconds=3.0, then="")
    proc = run_script(scenario(body), timeout=20)
    assert "main exits" in proc.stdout, describe(proc)
    assert_clean_exit(proc)


def test_ctrl_c_while_the_exit_waits_for_a_busy_shard_exits_at_once() -> None:
    """Fault: Ctrl-C while the exiting interpreter waited for a shard busy in
    Python let finalization end that shard and abort the process. Expected:
    the process ends at once, with status 130 and a message, no abort."""
    kill_soon = (
        "threading.Thread(target=lambda: (time.sleep(1.0), "
        "os.kill(os.getpid(), signal.SIGINT)), daemon=True).start()"
    )
    body = BUSY_AT_EXIT.format(wait=5.0, seconds=30.0, then=kill_soon)
    began = time.monotonic()
    proc = run_script(scenario(body), timeout=20)
    took = time.monotonic() - began
    assert_clean_exit(proc, code=130)
    assert "exiting now" in proc.stderr, describe(proc)
    assert took < 10, f"took {took:.1f}s\n{describe(proc)}"


def test_run_on_threads_twice_in_a_row_and_two_at_once() -> None:
    """Fault: runtimes started on other threads, one after another and two
    at the same time. Expected: each returns its own result, every shard
    thread is gone afterwards, exit code 0."""
    body = """
    async def work(tag):
        ids = await shard.invoke_on_all(shard.id)
        values = await asyncio.gather(*(shard.submit_to(1, pow, tag, 2) for _ in range(200)))
        return tag, ids, set(values)

    results = {}

    def in_thread(tag):
        results[tag] = run2(work(tag))

    print("main", run2(work(1)), flush=True)
    print("again", run2(work(2)), flush=True)
    for batch in ((3,), (4, 5)):
        threads = [threading.Thread(target=in_thread, args=(tag,)) for tag in batch]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
            assert not t.is_alive(), "a runtime in a thread did not finish"
    for tag in (3, 4, 5):
        assert results[tag] == (tag, [0, 1], {tag * tag}), results
    assert wait_for(lambda: os_threads() == BASE_THREADS), "shard threads left behind"
    print("ok", flush=True)
    """
    proc = run_script(scenario(body), timeout=30)
    assert_clean_exit(proc)
    assert "main (1, [0, 1], {1})" in proc.stdout, describe(proc)
    assert "again (2, [0, 1], {4})" in proc.stdout, describe(proc)
    assert "ok" in proc.stdout, describe(proc)


def test_two_runtimes_at_once_do_not_see_each_other() -> None:
    """Fault: two runtimes alive at the same time (one on a thread, one on
    the main thread) calling across their shards. Expected: each call runs
    on its own runtime's shard (distinct loops), no panic, exit code 0."""
    body = """
    started = threading.Event()
    finish = threading.Event()
    loops = {}

    def loop_id():
        return id(asyncio.get_running_loop())

    async def serve(name):
        started.set()
        seen = set()
        while not finish.is_set():
            seen.add(await shard.submit_to(1, loop_id))
            await asyncio.sleep(0.001)
        loops[name] = seen
        return name

    t = threading.Thread(target=lambda: run2(serve("thread")))
    t.start()
    assert started.wait(10)

    async def main():
        seen = set()
        for _ in range(300):
            seen.add(await shard.submit_to(1, loop_id))
        loops["main"] = seen
        finish.set()

    run2(main())
    t.join(15)
    assert not t.is_alive()
    assert len(loops["main"]) == 1 and len(loops["thread"]) == 1, loops
    assert loops["main"].isdisjoint(loops["thread"]), loops
    print("ok", flush=True)
    """
    proc = run_script(scenario(body), timeout=30)
    assert_clean_exit(proc)
    assert "ok" in proc.stdout, describe(proc)


NESTED = """
import warnings
warnings.simplefilter("always")

async def inner():
    return 1

async def main():
    coro = inner()
    threads_before = os_threads()
    try:
        shardloop.run(coro, shards=2, pin=False)
    except RuntimeError as exc:
        print("nested:", exc, flush=True)
    else:
        print("nested: no error", flush=True)
    finally:
        coro.close()
    assert wait_for(lambda: os_threads() == threads_before), "threads left behind"
    return await shard.submit_to(1, shard.id)

print("outer", run2(main()), flush=True)
"""


def test_nested_run_raises_a_clear_runtime_error() -> None:
    """Fault: shardloop.run() called inside a running runtime. Expected: a
    clear RuntimeError saying a loop is running, as asyncio.run gives, with
    no thread left behind, and the outer runtime keeps working."""
    proc = run_script(scenario(NESTED), timeout=10)
    assert_clean_exit(proc)
    assert "outer 1" in proc.stdout, describe(proc)
    nested = next(line for line in proc.stdout.splitlines() if line.startswith("nested:"))
    assert "running" in nested.lower(), describe(proc)


def test_nested_run_leaves_no_half_closed_loop_behind() -> None:
    """Fault: the nested run() above built a whole runtime before failing,
    and closing its loop left "RuntimeWarning: coroutine
    'BaseEventLoop.shutdown_asyncgens' was never awaited". Expected: as with
    asyncio.run, the nested call fails without such traces."""
    proc = run_script(scenario(NESTED), timeout=10)
    assert_clean_exit(proc)
    assert "never awaited" not in proc.stderr, describe(proc)
