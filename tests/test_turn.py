"""The loop's turn (ready queue, timers, handles) in Rust: each behaviour is
checked on stock asyncio and on a shard loop, and must be the same."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import shardloop
from conftest import LOOPS

Run = Callable[[Coroutine[Any, Any, Any]], Any]

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")


def noop(*args: object) -> None:
    pass


async def turns(count: int) -> None:
    """Lets the loop turn ``count`` times."""
    for _ in range(count):
        await asyncio.sleep(0)


def scheduled_timers(loop: asyncio.AbstractEventLoop) -> int:
    """How many timers the loop's heap holds, cancelled ones included."""
    if isinstance(loop, shardloop.ShardLoop):
        return loop._turn.pending()[1]
    return len(loop._scheduled)  # type: ignore[attr-defined]


def test_callbacks_run_in_order_and_those_they_queue_wait_a_turn(run_on: Run) -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        order: list[str] = []

        def first() -> None:
            order.append("first")
            loop.call_soon(order.append, "queued by first")

        loop.call_soon(first)
        loop.call_soon(order.append, "second")
        loop.call_soon(order.append, "cancelled").cancel()
        await turns(1)
        seen_after_one_turn = list(order)
        await turns(1)
        return [*seen_after_one_turn, "|", *order]

    assert run_on(main()) == [
        "first",
        "second",
        "|",
        "first",
        "second",
        "queued by first",
    ]


def test_timers_fire_in_time_order_and_cancelled_ones_never(run_on: Run) -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        fired: list[str] = []
        now = loop.time()
        for name, delay in [("c", 0.03), ("a", 0.01), ("b", 0.02)]:
            loop.call_at(now + delay, fired.append, name)
        loop.call_later(0.015, fired.append, "cancelled").cancel()
        late = loop.call_later(0.025, fired.append, "cancelled late")
        await asyncio.sleep(0.022)
        late.cancel()
        await asyncio.sleep(0.03)
        return fired

    assert run_on(main()) == ["a", "b", "c"]


def test_a_timer_fires_no_sooner_than_asked(run_on: Run) -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        start = loop.time()
        loop.call_later(0.05, lambda: done.set_result(loop.time() - start))
        took = await done
        return [took]

    (took,) = run_on(main())
    assert took >= 0.05 - 1e-3


def test_the_heap_drops_its_cancelled_timers_as_asyncio_does(run_on: Run) -> None:
    async def main() -> tuple[int, int, bool, bool]:
        loop = asyncio.get_running_loop()
        timers = [loop.call_later(3600 + i, noop) for i in range(200)]
        # A quarter: only those at the head would go, but the head is the
        # test's own time limit (wait_for's timer), which is due sooner.
        for timer in timers[:50]:
            timer.cancel()
        await turns(2)
        after_quarter = scheduled_timers(loop)
        for timer in timers[50:150]:  # three quarters: all of them go
            timer.cancel()
        await turns(2)
        after_most = scheduled_timers(loop)
        for timer in timers[150:]:
            timer.cancel()
        return after_quarter, after_most, timers[0]._scheduled, timers[199]._scheduled  # type: ignore[attr-defined]

    assert run_on(main()) == (201, 51, False, True)


def test_a_failing_callback_is_reported_and_the_loop_goes_on(run_on: Run) -> None:
    async def main() -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        reports: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reports.append(context))

        def boom(x: int) -> None:
            raise ValueError(x)

        handle = loop.call_soon(boom, 1)
        after: list[str] = []
        loop.call_soon(after.append, "ran")
        await turns(2)
        (report,) = reports
        return (
            report["message"].startswith("Exception in callback ") and "boom(" in report["message"],
            report["handle"] is handle,
            type(report["exception"]),
            report["exception"].__traceback__ is not None,
            after,
        )

    assert run_on(main()) == (True, True, ValueError, True, ["ran"])


@pytest.mark.parametrize("kind", sorted(LOOPS))
@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_what_stops_a_loop_leaves_the_rest_queued(kind: str, error: type) -> None:
    loop = LOOPS[kind]()
    try:
        order: list[int] = []

        def stop_here() -> None:
            raise error

        loop.call_soon(order.append, 1)
        loop.call_soon(stop_here)
        loop.call_soon(order.append, 2)
        with pytest.raises(error):
            loop.run_forever()
        assert order == [1]
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert order == [1, 2]
    finally:
        try:
            loop.close()
        except (KeyboardInterrupt, SystemExit):
            pass


def test_callbacks_run_in_their_context(run_on: Run) -> None:
    async def main() -> tuple[list[str], str]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        given = contextvars.copy_context()
        given.run(var.set, "given")
        var.set("current")
        loop.call_soon(lambda: seen.append(var.get()), context=given)
        loop.call_soon(lambda: seen.append(var.get()))
        loop.call_soon(var.set, "set in a copy")
        loop.call_later(0, lambda: seen.append(var.get()), context=given)
        await asyncio.sleep(0.01)
        return seen, var.get()

    assert run_on(main()) == (["given", "current", "given"], "current")


def test_handles_answer_as_asyncio_s_do(run_on: Run) -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        handle = loop.call_soon(noop, 1, 2, context=context)
        timer = loop.call_at(12345.0, noop)
        twin = loop.call_at(12345.0, noop)
        later = loop.call_at(12346.0, noop)
        answers = [
            repr(handle) == repr(asyncio.Handle(noop, (1, 2), loop)),
            repr(timer) == repr(asyncio.TimerHandle(12345.0, noop, (), loop)),
            handle._context is context,
            handle.cancelled(),
            timer.when(),
            timer < later and later > timer and timer <= twin,
            timer == twin and hash(timer) == hash(twin) and timer != later,
        ]
        handle.cancel()
        timer.cancel()
        handle.cancel()  # twice is once
        answers += [
            handle.cancelled(),
            repr(handle),
            repr(timer),
            timer != twin,  # a cancelled timer differs from its twin
        ]
        twin.cancel()
        later.cancel()
        return answers

    assert run_on(main()) == [
        True,
        True,
        True,
        False,
        12345.0,
        True,
        True,
        True,
        "<Handle cancelled>",
        "<TimerHandle cancelled when=12345.0>",
        True,
    ]


@pytest.mark.parametrize("kind", sorted(LOOPS))
def test_a_closed_loop_takes_no_callback(kind: str) -> None:
    loop = LOOPS[kind]()
    loop.close()
    for schedule in (
        lambda: loop.call_soon(noop),
        lambda: loop.call_later(1, noop),
        lambda: loop.call_at(1, noop),
        lambda: loop.call_soon_threadsafe(noop),
    ):
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            schedule()


def test_a_missing_time_is_a_type_error(run_on: Run) -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        errors = []
        for schedule in (
            lambda: loop.call_later(None, noop),  # type: ignore[arg-type]
            lambda: loop.call_at(None, noop),  # type: ignore[arg-type]
        ):
            try:
                schedule()
            except TypeError as exc:
                errors.append(str(exc))
        return errors

    assert run_on(main()) == ["delay must not be None", "when cannot be None"]


def test_other_threads_must_use_call_soon_threadsafe() -> None:
    async def main() -> tuple[str, list[str]]:
        loop = asyncio.get_running_loop()
        outcome: list[str] = []
        order: list[str] = []

        def elsewhere() -> None:
            try:
                loop.call_soon(noop)
            except RuntimeError as exc:
                outcome.append(str(exc))
            loop.call_soon_threadsafe(order.append, "from the thread")

        thread = threading.Thread(target=elsewhere)
        thread.start()
        await asyncio.to_thread(thread.join)
        loop.call_soon(order.append, "from the loop")
        await turns(2)
        return outcome[0], order

    message, order = shardloop.run(asyncio.wait_for(main(), 30), shards=1, pin=False)
    assert "call_soon_threadsafe" in message
    assert order == ["from the thread", "from the loop"]


def test_a_timer_in_a_cycle_is_collected(run_on: Run) -> None:
    class Holder:
        timer: asyncio.TimerHandle

        def fire(self) -> None:
            pass

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        holder = Holder()
        holder.timer = loop.call_later(0, holder.fire)  # holder -> timer -> holder
        gone = weakref.ref(holder)
        del holder
        await asyncio.sleep(0.01)
        gc.collect()
        return gone() is None

    assert run_on(main())


def test_debug_mode_reports_slow_callbacks(run_on: Run, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = 0.01
        handle = loop.call_soon(time.sleep, 0.02)
        traced = handle._source_traceback[-1][2]  # type: ignore[attr-defined]
        await turns(2)
        loop.set_debug(False)
        return [traced]

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        assert run_on(main()) == ["main"]
    slow = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert any(m.startswith("Executing <Handle sleep(0.02)") for m in slow), slow


def test_in_debug_mode_a_finished_task_is_freed_at_once(run_on: Run) -> None:
    """No cycle through the turn's frames keeps a task that failed: its
    unretrieved exception is reported in the same turn, not at the next
    garbage collection."""

    async def fail() -> None:
        raise ZeroDivisionError

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.set_exception_handler(lambda _loop, _context: None)
        gone = weakref.ref(asyncio.ensure_future(fail()))
        await turns(2)
        loop.set_debug(False)
        return gone() is None

    gc.disable()
    try:
        assert run_on(main())
    finally:
        gc.enable()
