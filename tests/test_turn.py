"""The loop's turn (ready queue, timers, handles) in Rust: each behaviour is
checked on stock asyncio and on a shard loop, and must be the same."""

from __future__ import annotations

import asyncio
import contextvars
import decimal
import fractions
import gc
import logging
import sys
import threading
import time
import warnings
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
        zero, negative_zero = loop.call_at(0.0, noop), loop.call_at(-0.0, noop)
        answers += [
            handle.cancelled(),
            repr(handle),
            repr(timer),
            timer != twin,  # a cancelled timer differs from its twin
            handle._context is context,  # kept once cancelled
            zero == negative_zero and hash(zero) == hash(negative_zero),
        ]
        zero.cancel()
        negative_zero.cancel()
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
        True,
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


def test_call_soon_from_another_thread_is_thread_safe_and_keeps_its_place() -> None:
    """asyncio's call_soon from another thread races; a shard loop's acts as
    call_soon_threadsafe: the loop wakes, and the order is kept."""

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        order: list[str] = []
        woken = loop.create_future()

        def elsewhere() -> None:
            loop.call_soon(order.append, "call_soon from the thread")
            loop.call_soon_threadsafe(order.append, "call_soon_threadsafe from the thread")
            loop.call_soon(woken.set_result, None)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        await asyncio.wait_for(woken, 10)
        thread.join()
        loop.call_soon(order.append, "from the loop")
        await turns(2)
        return order

    assert shardloop.run(asyncio.wait_for(main(), 30), shards=1, pin=False) == [
        "call_soon from the thread",
        "call_soon_threadsafe from the thread",
        "from the loop",
    ]


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
        cancelled = loop.call_soon(noop)
        cancelled.cancel()
        loop.set_debug(False)
        shown = repr(cancelled)
        return [traced, shown.startswith("<Handle cancelled noop() at ") and "created at" in shown]

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        assert run_on(main()) == ["main", True]
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


def test_a_time_that_is_nan_is_refused_and_the_other_timers_go_on() -> None:
    """asyncio takes a NaN time, then fires it at once (3.11) or fails in
    select (3.13); a shard loop refuses it where it is given."""

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        refused = []
        for schedule in (
            lambda: loop.call_at(float("nan"), noop),
            lambda: loop.call_at(-float("nan"), noop),  # sorts before every number
            lambda: loop.call_later(float("inf") - float("inf"), noop),
        ):
            try:
                schedule()
            except ValueError as exc:
                refused.append(str(exc))
        await asyncio.sleep(0.01)
        return refused

    assert (
        shardloop.run(asyncio.wait_for(main(), 30), shards=1, pin=False)
        == ["when cannot be NaN"] * 3
    )


def test_a_future_completed_by_another_thread_wakes_its_task() -> None:
    """A worker thread that completes a future directly (rather than with
    call_soon_threadsafe) still wakes the task that awaits it."""

    async def main() -> tuple[int, float, str]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        timer_fired = loop.create_future()

        def worker() -> None:
            time.sleep(0.05)
            future.set_result(42)
            loop.call_later(0.01, timer_fired.set_result, "timer from a thread")

        start = loop.time()
        threading.Thread(target=worker).start()
        value = await asyncio.wait_for(future, 10)
        took = loop.time() - start
        return value, took, await asyncio.wait_for(timer_fired, 10)

    value, took, timer = shardloop.run(main(), shards=1, pin=False)
    assert (value, timer) == (42, "timer from a thread")
    assert took < 5


def test_a_loop_dropped_unclosed_with_callbacks_pending_is_collected() -> None:
    def dropped() -> weakref.ref[asyncio.AbstractEventLoop]:
        loop = shardloop.new_event_loop(1, pin=False)
        loop.call_later(3600, noop)
        loop.call_soon(noop)
        return weakref.ref(loop)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gone = dropped()
        gc.collect()
    assert gone() is None


@pytest.mark.parametrize("kind", sorted(LOOPS))
def test_a_fake_clock_set_on_the_loop_is_its_clock(kind: str) -> None:
    async def main() -> str:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(5)
        except TimeoutError:
            return "timed out"
        return "not timed out"

    loop = LOOPS[kind]()
    try:
        real = loop.time
        loop.time = lambda: real() + 1000.0  # type: ignore[method-assign]
        assert loop.run_until_complete(main()) == "timed out"
    finally:
        loop.close()


def test_what_the_user_sets_on_the_loop_survives_set_debug(run_on: Run) -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        calls = 0
        original = loop.call_soon

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return original(*args, **kwargs)

        loop.call_soon = counting  # type: ignore[method-assign]
        loop.set_debug(True)
        loop.set_debug(False)
        loop.call_soon(noop)
        del loop.call_soon
        return calls

    assert run_on(main()) == 1


def test_delays_are_those_a_float_adds_with(run_on: Run) -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        outcomes = []
        for debug in (False, True):
            loop.set_debug(debug)
            try:
                loop.call_later(decimal.Decimal("0.5"), noop).cancel()
                outcomes.append("taken")
            except TypeError:
                outcomes.append("TypeError")
            loop.call_later(fractions.Fraction(1, 2), noop).cancel()
        loop.set_debug(False)
        return outcomes

    assert run_on(main()) == ["TypeError", "TypeError"]


def test_in_debug_mode_a_handle_from_another_thread_names_its_caller(run_on: Run) -> None:
    async def main() -> str:
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        made: list[Any] = []

        def elsewhere() -> None:
            made.append(loop.call_soon_threadsafe(noop))

        thread = threading.Thread(target=elsewhere)
        thread.start()
        await asyncio.to_thread(thread.join)
        loop.set_debug(False)
        return str(made[0]._source_traceback[-1][2])

    assert run_on(main()) == "elsewhere"


def test_call_later_goes_through_the_loop_s_call_at(run_on: Run) -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        seen: list[float] = []
        original = loop.call_at

        def call_at(when: float, *args: Any, **kwargs: Any) -> Any:
            seen.append(when - loop.time())
            return original(when, *args, **kwargs)

        loop.call_at = call_at  # type: ignore[method-assign]
        try:
            loop.call_later(100, noop).cancel()
        finally:
            del loop.call_at
        return [round(delay) for delay in seen]

    assert run_on(main()) == [100]


def test_the_exception_handler_runs_as_in_an_except_block(run_on: Run) -> None:
    async def main() -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        handled: list[Any] = []
        loop.set_exception_handler(lambda _loop, context: handled.append(sys.exc_info()[1]))

        def boom() -> None:
            raise ValueError("boom")

        loop.call_soon(boom)
        await turns(2)
        return type(handled[0]), sys.exc_info()[1]

    assert run_on(main()) == (ValueError, None)


def test_timers_compare_as_asyncio_s_do(run_on: Run) -> None:
    async def main() -> list[bool]:
        loop = asyncio.get_running_loop()
        a = loop.call_at(12345.0, noop)
        b = loop.call_at(12345.0, print)  # same time, another callback
        answers = [a <= b, a >= b, a == b, a < b, a > b]
        a.cancel()
        b.cancel()
        return answers

    assert run_on(main()) == [False, False, False, False, False]


def test_a_shard_has_one_scheduler() -> None:
    async def main() -> str:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, shardloop.ShardLoop)
        try:
            loop._driver.scheduler(loop, loop._ready, True, 1e-9)  # type: ignore[attr-defined]
        except RuntimeError as exc:
            return str(exc)
        return "made a second one"

    assert "already has its scheduler" in shardloop.run(main(), shards=1, pin=False)
