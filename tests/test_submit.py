"""Cross-shard calls: results, where they run, errors, cancellation."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import traceback
from typing import Any

import pytest
import shardloop
from conftest import run2
from shardloop import shard


def where(x: int) -> tuple[int, int, str]:
    return x * 2, shard.id(), threading.current_thread().name


async def async_where(x: int) -> tuple[int, int, int]:
    await asyncio.sleep(0.001)
    return x + 1, shard.id(), id(asyncio.get_running_loop())


def test_plain_function_runs_on_the_target_shard() -> None:
    async def main() -> None:
        value, on, thread = await shard.submit_to(1, where, 21)
        assert (value, on) == (42, 1)
        assert thread != threading.current_thread().name
        assert await shard.submit_to(0, where, 1) == (2, 0, threading.current_thread().name)

    run2(main())


def test_coroutine_function_runs_as_a_task_on_the_target() -> None:
    async def main() -> None:
        value, on, loop_id = await shard.submit_to(2, async_where, 1)
        assert (value, on) == (2, 2)
        assert loop_id != id(asyncio.get_running_loop())

    run2(main(), shards=3)


def test_keyword_arguments_and_many_in_flight() -> None:
    def combine(a: int, *, b: int) -> int:
        return a * 10 + b

    async def main() -> list[int]:
        return list(
            await asyncio.gather(*(shard.submit_to(1, combine, i, b=1) for i in range(3000)))
        )

    assert run2(main()) == [i * 10 + 1 for i in range(3000)]


def test_invoke_on_all_and_others_in_shard_order() -> None:
    async def main() -> tuple[list[int], list[int], int, int]:
        return (
            await shard.invoke_on_all(shard.id),
            await shard.invoke_on_others(shard.id),
            shard.id(),
            shard.count(),
        )

    assert run2(main(), shards=3) == ([0, 1, 2], [1, 2], 0, 3)


class Boom(Exception):
    pass


def explode(message: str) -> None:
    raise Boom(message)


async def async_explode() -> None:
    await asyncio.sleep(0)
    raise Boom("async")


def test_exception_comes_back_with_traceback_and_shard_note() -> None:
    async def main() -> None:
        with pytest.raises(Boom, match="remote") as info:
            await shard.submit_to(1, explode, "remote")
        assert "raised on shard 1" in info.value.__notes__
        frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
        assert "explode" in frames
        with pytest.raises(Boom, match="async") as info:
            await shard.submit_to(1, async_explode)
        assert "raised on shard 1" in info.value.__notes__
        # The shard keeps serving.
        assert (await shard.submit_to(1, where, 1))[0] == 2

    run2(main())


def test_bad_shard_raises_value_error_naming_the_range_before_sending() -> None:
    async def main() -> None:
        for bad in (2, 99, -1):
            with pytest.raises(ValueError, match=r"the runtime has 2 shards, 0 to 1"):
                shard.submit_to(bad, where, 1)
        assert all(q["sent"] == 0 for q in shardloop.stats()["queues"])

    run2(main())


def test_submit_outside_a_runtime_says_how_to_start_one() -> None:
    with pytest.raises(RuntimeError, match=r"shardloop\.run"):
        shard.submit_to(0, where, 1)

    async def on_plain_asyncio() -> None:
        shard.submit_to(0, where, 1)

    with pytest.raises(RuntimeError, match=r"shardloop\.run"):
        asyncio.run(on_plain_asyncio())


def test_cancelling_the_caller_cancels_the_remote_coroutine() -> None:
    async def main() -> list[str]:
        events: list[str] = []

        async def slow() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                events.append(f"cancelled on {shard.id()}")
                raise

        call = shard.submit_to(1, slow)
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(200):
            if events:
                break
            await asyncio.sleep(0.01)
        return events

    assert run2(main()) == ["cancelled on 1"]


def test_cancelled_plain_call_still_runs_and_its_result_is_dropped() -> None:
    ran = threading.Event()

    def slow_plain() -> int:
        ran.set()
        return 1

    async def main() -> None:
        call = shard.submit_to(1, slow_plain)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.get_running_loop().run_in_executor(None, ran.wait, 10)
        assert (await shard.submit_to(1, where, 3))[0] == 6

    run2(main())
    assert ran.is_set()


def test_work_submitted_before_shutdown_is_finished() -> None:
    done: list[int] = []

    async def record(i: int) -> None:
        await asyncio.sleep(0.05)
        done.append(i)

    async def main() -> None:
        for i in range(10):
            shard.submit_to(1, record, i)  # not awaited

    run2(main())
    assert sorted(done) == list(range(10))


def test_a_call_still_running_at_shutdown_may_make_calls_of_its_own() -> None:
    outcome: list[object] = []

    async def later() -> None:
        await asyncio.sleep(0.1)  # main() has returned by now
        outcome.append(await shard.submit_to(0, where, 1))

    async def main() -> None:
        shard.submit_to(1, later)  # admitted work, not awaited

    run2(main())
    assert outcome == [(2, 0, threading.current_thread().name)]


def test_background_tasks_are_cancelled_when_main_returns_and_may_still_call() -> None:
    outcome: list[object] = []
    started = threading.Event()

    async def background() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            # Cancelled as the drain begins: its clean-up may still call.
            outcome.append(await shard.submit_to(0, where, 1))
            raise

    def spawn() -> None:
        # A task of shard 1 that no call waits for.
        tasks.append(asyncio.get_running_loop().create_task(background()))

    tasks: list[asyncio.Task[None]] = []

    async def main() -> None:
        await shard.submit_to(1, spawn)
        assert started.wait(5)

    run2(main())
    assert outcome == [(2, 0, threading.current_thread().name)]


def test_a_task_left_after_the_drain_cannot_send_more() -> None:
    outcome: list[BaseException | str] = []

    async def background() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            try:
                shard.submit_to(0, where, 1)
            except shardloop.ShutdownError as exc:
                outcome.append(exc)
            else:
                outcome.append("sent")

    async def late_call() -> None:
        await asyncio.sleep(0.05)  # main() has returned: the drain is on
        tasks.append(asyncio.get_running_loop().create_task(background()))

    tasks: list[asyncio.Task[None]] = []

    async def main() -> None:
        shard.submit_to(1, late_call)

    run2(main())
    assert len(outcome) == 1 and isinstance(outcome[0], shardloop.ShutdownError)


def test_invoke_on_all_sends_to_the_others_before_running_its_own_part() -> None:
    started = threading.Event()

    def part() -> bool:
        if shard.id() == 0:
            return started.wait(5)  # only true if shard 1 ran meanwhile
        started.set()
        return True

    async def main() -> list[bool]:
        return await shard.invoke_on_all(part)

    assert run2(main()) == [True, True]


def test_a_call_to_the_calling_shard_runs_when_the_caller_yields() -> None:
    """A local submit_to is queued like any other: the caller goes on, and
    the call runs at its next await, as loop.call_soon would run it."""
    log: list[str] = []

    def note(what: str) -> str:
        log.append(what)
        return what

    async def main() -> None:
        call = shard.submit_to(0, note, "the local call")
        log.append("the caller goes on")
        assert await call == "the local call"
        assert log == ["the caller goes on", "the local call"]

    run2(main())


def test_a_fan_out_written_the_obvious_way_starts_every_shard_at_once() -> None:
    """[submit_to(i % n, burn) for i ...] from shard 0: before, the local
    chunks ran inline as they were submitted, so shard 1 got its first chunk
    only after shard 0 had run a whole one. Now every call is sent before
    any local one runs: shard 1 starts while shard 0 runs its first chunk."""

    def burn(seconds: float) -> tuple[int, float, float]:
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            pass
        return shard.id(), began, time.monotonic()

    async def main() -> list[tuple[int, float, float]]:
        n = shard.count()
        return await asyncio.gather(*[shard.submit_to(i % n, burn, 0.2) for i in range(4)])

    spans = run2(main())
    first_on_0 = min(spans[i] for i in (0, 2))
    first_on_1 = min(spans[i] for i in (1, 3))
    assert first_on_1[1] < first_on_0[2], (
        f"shard 1 started {first_on_1[1] - first_on_0[1]:.3f}s after shard 0, "
        f"after shard 0's first chunk ended"
    )


def test_a_call_to_the_calling_shard_is_settled_as_a_remote_one() -> None:
    """A local call returns a future (not the task), its error carries the
    note naming the shard, and cancelling the caller cancels its task."""
    cancelled: list[bool] = []
    started = asyncio.Event()

    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("local")

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> None:
        call = shard.submit_to(0, fails)
        assert not isinstance(call, asyncio.Task)
        with pytest.raises(ValueError, match="local") as raised:
            await call
        assert "raised on shard 0" in (raised.value.__notes__ or [])
        waiting = shard.submit_to(0, forever)
        await started.wait()
        waiting.cancel()
        for _ in range(100):
            if cancelled:
                break
            await asyncio.sleep(0.01)
        assert cancelled == [True]

    run2(main())


async def task_facts() -> tuple[bool, str]:
    task = asyncio.current_task()
    return task is not None, VAR.get()


VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


async def sets_var() -> str:
    VAR.set("set by a call")
    return VAR.get()


@pytest.mark.shardloop(shards=2)
async def test_a_coroutine_call_runs_as_a_task_in_a_context_of_its_own() -> None:
    # It may finish in its first step (eagerly, on 3.12+), and is still a task.
    assert await shard.submit_to(1, task_facts) == (True, "unset")
    assert await shard.submit_to(1, sets_var) == "set by a call"
    assert await shard.submit_to(1, task_facts) == (True, "unset")


def install_factory() -> None:
    loop = asyncio.get_running_loop()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        MADE.append(getattr(coro, "__name__", "?"))
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)


MADE: list[str] = []


@pytest.mark.shardloop(shards=2)
async def test_a_task_factory_of_the_target_makes_the_call_tasks() -> None:
    await shard.submit_to(1, install_factory)
    assert await shard.submit_to(1, sets_var) == "set by a call"
    assert await shard.submit_to(1, lambda: list(MADE)) == ["sets_var"]
