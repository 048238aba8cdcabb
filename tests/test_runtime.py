"""The runtime as a whole: loops, services, handles, counters, idling,
shutdown."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import shardloop
from conftest import run2
from shardloop import shard

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_every_shard_has_its_own_running_loop() -> None:
    def loop_info() -> tuple[int, str, int]:
        loop = asyncio.get_running_loop()
        return shard.id(), type(loop).__name__, id(loop)

    async def main() -> list[tuple[int, str, int]]:
        return await shard.invoke_on_all(loop_info)

    info = run2(main(), shards=3)
    assert [i[0] for i in info] == [0, 1, 2]
    assert {i[1] for i in info} == {"ShardLoop"}
    assert len({i[2] for i in info}) == 3


def test_new_event_loop_reads_shardloop_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDLOOP_SHARDS", "3")
    loop = shardloop.new_event_loop(pin=False)
    try:
        assert loop.run_until_complete(shard.invoke_on_all(shard.id)) == [0, 1, 2]
    finally:
        loop.close()
    monkeypatch.setenv("SHARDLOOP_SHARDS", "many")
    with pytest.raises(ValueError, match="SHARDLOOP_SHARDS"):
        shardloop.new_event_loop(pin=False)


def test_a_cpuset_places_shard_i_on_its_ith_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinned, shard i runs on the i-th CPU of the cpuset alone, and the
    number of shards defaults to the cpuset's; unpinned, every shard stays
    within the set. SHARDLOOP_CPUSET is read when no cpuset is given."""
    allowed = sorted(os.sched_getaffinity(0))
    cpus = list(reversed(allowed))

    def where() -> set[int]:
        return os.sched_getaffinity(0)

    async def main() -> list[set[int]]:
        return await shard.invoke_on_all(where)

    assert shardloop.run(main(), cpuset=cpus) == [{cpu} for cpu in cpus]
    monkeypatch.setenv("SHARDLOOP_CPUSET", f"{allowed[-1]}")
    assert shardloop.run(main()) == [{allowed[-1]}]
    monkeypatch.delenv("SHARDLOOP_CPUSET")
    last = allowed[-1]
    assert shardloop.run(main(), cpuset=[last], shards=2, overprovisioned=True) == [{last}] * 2
    assert shardloop.run(main(), cpuset=str(last), shards=1, pin=False) == [{last}]
    assert os.sched_getaffinity(0) == set(allowed), "shard 0's affinity is given back"


def test_a_bad_cpuset_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    outside = max(allowed) + 1
    cases: list[tuple[Any, dict[str, Any], type[Exception], str]] = [
        ([outside], {}, ValueError, f"CPU {outside} that this process may not run on"),
        ([], {}, ValueError, "names no CPU"),
        ([allowed[0], allowed[0]], {}, ValueError, f"CPU {allowed[0]} twice"),
        ([allowed[0]], {"shards": 2}, ValueError, "2 shards on a cpuset of 1 CPU"),
        ([-1], {}, ValueError, "CPU numbers from 0 to 1023, not -1"),
        ([2**70], {}, ValueError, "CPU numbers from 0 to 1023"),
        ("0-100000000", {}, ValueError, "CPU numbers from 0 to 1023, not 100000000"),
        (["0"], {}, TypeError, "CPU numbers"),
        (3, {}, TypeError, "cpuset must be a list"),
        ("0-", {}, ValueError, "CPU list such as"),
        ("3-1", {}, ValueError, "empty range"),
    ]
    for cpuset, options, error, words in cases:
        with pytest.raises(error, match=re.escape(words)):
            shardloop.new_event_loop(cpuset=cpuset, **options)
    monkeypatch.setenv("SHARDLOOP_CPUSET", "zero")
    with pytest.raises(ValueError, match="SHARDLOOP_CPUSET must be a CPU list"):
        shardloop.new_event_loop()


def test_asyncio_run_with_loop_factory_and_policy() -> None:
    async def main() -> int:
        return shard.count()

    factory = lambda: shardloop.new_event_loop(2, pin=False)  # noqa: E731
    if sys.version_info >= (3, 12):
        assert asyncio.run(main(), loop_factory=factory) == 2
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(main()) == 2
    policy = shardloop.EventLoopPolicy()
    loop = policy.new_event_loop()
    try:
        assert isinstance(loop, shardloop.ShardLoop)
    finally:
        loop.close()


def test_zero_or_negative_shards_and_odd_arguments_are_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault: shards=-1 or SHARDLOOP_SHARDS=-3 raised OverflowError ("can't
    convert negative int to unsigned"), and idle_poll="0.1" a comparison
    error. Expected: ValueError or TypeError naming the argument."""
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"shards must be at least 1, not {bad}"):
            shardloop.new_event_loop(bad)
    with pytest.raises(TypeError, match="shards must be an int, not str"):
        shardloop.new_event_loop("2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="idle_poll must be a number of seconds, not str"):
        shardloop.new_event_loop(2, idle_poll="0.1")  # type: ignore[arg-type]
    monkeypatch.setenv("SHARDLOOP_SHARDS", "-3")
    with pytest.raises(ValueError, match="SHARDLOOP_SHARDS must be at least 1, not -3"):
        shardloop.new_event_loop(pin=False)


def test_more_shards_than_the_most_is_an_error() -> None:
    with pytest.raises(ValueError, match="at most 256"):
        shardloop.new_event_loop(257)


class Counter:
    def __init__(self, start: int) -> None:
        self.value = start
        self.stopped_on: int | None = None
        self.shard = shard.id()

    async def add(self, n: int) -> int:
        await asyncio.sleep(0)
        self.value += n
        return self.shard

    def stop(self) -> None:
        self.stopped_on = shard.id()
        STOPPED.append((self.shard, self.stopped_on))


STOPPED: list[tuple[int, int]] = []


def test_sharded_service_lives_on_every_shard() -> None:
    STOPPED.clear()

    async def main() -> tuple[Any, ...]:
        counters = await shardloop.Sharded(Counter, 10).start()
        local = counters.local()
        on = await counters.invoke_on(2, "add", 5)
        shards_seen = await counters.invoke_on_all(lambda c: c.shard)
        total = await counters.map_reduce(lambda c: c.value, lambda acc, v: acc + v, 0)
        await counters.stop()
        with pytest.raises(RuntimeError, match="not started"):
            counters.local()
        return local.shard, on, shards_seen, total

    assert run2(main(), shards=3) == (0, 2, [0, 1, 2], 35)
    assert sorted(STOPPED) == [(0, 0), (1, 1), (2, 2)]


class Resource:
    def __init__(self) -> None:
        self.owner = shard.id()

    def whoami(self) -> tuple[int, int]:
        return self.owner, shard.id()


def test_foreign_ref_routes_calls_and_releases_on_the_owner() -> None:
    freed: list[int] = []

    def make_ref() -> shardloop.ForeignRef[Resource]:
        resource = Resource()
        weakref.finalize(resource, lambda: freed.append(shard.id()))
        return shardloop.ForeignRef(resource)

    async def use_elsewhere(ref: shardloop.ForeignRef[Resource]) -> tuple[int, int]:
        with pytest.raises(RuntimeError, match="owned by shard 1"):
            ref.get()
        return await ref.invoke("whoami")

    async def main() -> tuple[int, tuple[int, int]]:
        ref = await shard.submit_to(1, make_ref)
        owner = ref.owner
        result = await shard.submit_to(2, use_elsewhere, ref)
        del ref
        gc.collect()
        for _ in range(200):
            if freed:
                break
            await asyncio.sleep(0.01)
        return owner, result

    assert run2(main(), shards=3) == (1, (1, 1))
    assert freed == [1]


def test_stats_are_plain_dicts_that_count() -> None:
    def nothing() -> None:
        return None

    async def main() -> dict[str, Any]:
        for _ in range(100):
            await shard.submit_to(1, nothing)
        return shardloop.stats()

    stats = run2(main())
    queue = next(q for q in stats["queues"] if (q["from"], q["to"]) == (0, 1))
    assert queue["sent"] == queue["received"] == queue["completed"] == 100
    assert queue["batches"] >= 1 and queue["max_depth"] >= 1
    assert {"polls", "tasks_run", "sleeps", "wakeups", "preempted"} <= set(stats["shards"][1])
    assert stats["shards"][1]["tasks_run"] >= 100


def test_idle_runtime_sleeps_and_uses_no_cpu() -> None:
    async def main() -> tuple[float, int, int]:
        await asyncio.sleep(0.1)  # longer than idle_poll: everyone sleeps
        before = shardloop.stats()["shards"]
        cpu = time.process_time()
        await asyncio.sleep(1.0)
        used = time.process_time() - cpu
        after = shardloop.stats()["shards"]
        return used, after[1]["sleeps"], after[1]["polls"] - before[1]["polls"]

    used, sleeps, polls = run2(main(), idle_poll=0.0002)
    assert sleeps >= 1, "shard 1 never slept"
    assert used < 0.1, f"an idle runtime used {used:.3f}s of CPU in 1s"
    assert polls < 1_000, f"shard 1 turned its loop {polls} times while idle"


@pytest.mark.skipif(
    getattr(sys, "_is_gil_enabled", lambda: True)(),
    reason="with the GIL, shards take turns in Python by design",
)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_free_threaded_shards_run_python_at_the_same_time() -> None:
    """Without a GIL, shards must not take turns in Python: each runs many
    short turns (30 us of Python, then `sleep(0)`, where the shard leaves
    Python to poll), and looks whether the other is inside a turn at the
    same time. Shards that took turns would see each other seldom, and
    would wait about a turn of the other's between their own."""
    turn = 30e-6
    turns = 4_000
    inside = [False, False]
    ready = [False, False]
    overlaps = [0, 0]
    long_gaps = [0, 0]

    async def short_turns() -> None:
        me = shard.id()
        other = 1 - me
        ready[me] = True
        while not ready[other]:
            await asyncio.sleep(0)
        for _ in range(turns):
            inside[me] = True
            until = time.perf_counter() + turn
            while time.perf_counter() < until:
                if inside[other]:
                    overlaps[me] += 1
                    break
            while time.perf_counter() < until:
                pass
            inside[me] = False
            left = time.perf_counter()
            await asyncio.sleep(0)
            if time.perf_counter() - left > turn:
                long_gaps[me] += 1

    async def main() -> None:
        await shard.invoke_on_all(short_turns)

    run2(main())
    together = sum(overlaps) / (2 * turns)
    waited = sum(long_gaps) / (2 * turns)
    assert together > 0.7, f"the shards were in Python together in {together:.0%} of their turns"
    assert waited < 0.25, f"{waited:.0%} of the shards' turns waited longer than a turn to start"


SERVED: list[Any] = []


async def calls_shard_zero_late() -> None:
    await asyncio.sleep(0.01)
    try:
        SERVED.append(await shard.submit_to(0, asyncio.sleep, 0.1, "slept"))
    except BaseException as exc:
        SERVED.append(exc)
        raise


def test_a_call_shard_zero_serves_when_main_returns_finishes() -> None:
    """Calls in flight finish when main() returns: those served on shard 0
    too, which asyncio.Runner would otherwise cancel with main()'s other
    tasks (and those are still cancelled)."""
    SERVED.clear()
    background: list[asyncio.Task[None]] = []

    async def main() -> None:
        background.append(asyncio.get_running_loop().create_task(asyncio.sleep(30)))
        shard.submit_to(1, calls_shard_zero_late)
        await asyncio.sleep(0.05)  # shard 0 serves shard 1's call now

    run2(main())
    assert SERVED == ["slept"]
    assert background[0].cancelled()


def test_keyboard_interrupt_stops_all_shards_cleanly() -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys
        import shardloop
        from shardloop import shard

        async def forever():
            await asyncio.sleep(3600)

        async def main():
            shard.submit_to(1, forever)
            print("ready", flush=True)
            await asyncio.sleep(3600)

        try:
            shardloop.run(main(), shards=2, pin=False)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    assert "interrupted" in out


def readme_programs() -> list[str]:
    """The README's ```python blocks that are whole programs: those that
    start a runtime (``shardloop.run(``); the others are fragments."""
    blocks = re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.MULTILINE | re.DOTALL)
    return [block for block in blocks if "shardloop.run(" in block]


def test_examples_of_the_readme_run(tmp_path: Path) -> None:
    programs = readme_programs()
    assert programs, "the README shows no complete program"
    # Two shards, whatever the machine: the examples call shard 1.
    env = dict(os.environ, SHARDLOOP_SHARDS="2")
    for index, program in enumerate(programs):
        script = tmp_path / f"readme_{index}.py"
        script.write_text(program)
        proc = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, f"{program}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
        if "print(" in program:
            assert proc.stdout.strip(), f"printed nothing:\n{program}"


def test_the_demo_example_shows_calls_crossing_shards() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--shards", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "2 shards, this is shard 0" in out
    # invoke_on_all ran once on each shard, each on a thread of its own.
    ran = re.findall(r"shard (\d+) runs on thread '([^']*)'", out)
    assert [shard_id for shard_id, _ in ran] == ["0", "1"], out
    assert len({thread for _, thread in ran}) == 2, out
    assert re.search(r"submit_to\(1, square, 12\) +-> 144\n", out), out
    assert re.search(r"submit_to\(1, slow_square, 12\) +-> 144\n", out), out
    rates = re.findall(r"(?:one at a time|1,000 in flight): +([\d,]+) calls/s", out)
    assert len(rates) == 2 and all(int(rate.replace(",", "")) > 0 for rate in rates), out
    # The queue 0 -> 1 carried the demo's 2 x 20,000 timed calls, and every
    # call it carried came back.
    queue = re.search(r"queue 0 -> 1: sent ([\d,]+), completed ([\d,]+)", out)
    assert queue, out
    sent, completed = (int(n.replace(",", "")) for n in queue.groups())
    assert sent == completed >= 40_000, out


def test_the_signal_wakeup_descriptor_is_given_back_after_run() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    previous = signal.set_wakeup_fd(a.fileno())
    try:

        async def main() -> None:
            # asyncio clears the wakeup descriptor when its last handler
            # goes at close; it must still end up as it was before run().
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: None)

        run2(main())
        assert signal.set_wakeup_fd(previous) == a.fileno()
    finally:
        a.close()
        b.close()
