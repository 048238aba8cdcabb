"""The future a cross-shard call returns (shardloop._shardloop.ShardFuture):
asyncio's future protocol, as the C Task, gather, wait_for, shield, wait and
TaskGroup use it, and its callbacks run in the pass that settles it."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import time
import traceback
import weakref

import pytest
import shardloop
from shardloop import shard
from shardloop._shardloop import ShardFuture


def add(x: int, y: int = 1) -> int:
    return x + y


def fail(message: str) -> None:
    raise ValueError(message)


STARTED: list[str] = []
CANCELLED: list[str] = []


async def sleeper(name: str) -> str:
    STARTED.append(name)
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        CANCELLED.append(name)
        raise
    return name


async def until(predicate, limit: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(limit / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


@pytest.mark.shardloop(shards=2)
async def test_a_call_returns_a_future_of_its_loop() -> None:
    future = shard.submit_to(1, add, 1)
    assert isinstance(future, ShardFuture)
    assert asyncio.isfuture(future)
    assert future.get_loop() is asyncio.get_running_loop()
    assert not future.done() and not future.cancelled()
    assert "pending" in repr(future) and "to shard 1" in repr(future)
    with pytest.raises(asyncio.InvalidStateError):
        future.result()
    with pytest.raises(asyncio.InvalidStateError):
        future.exception()
    assert await future == 2
    assert future.done() and future.result() == 2 and future.exception() is None
    assert "result=2" in repr(future)
    # Awaiting a done future again gives its result again.
    assert await future == 2


@pytest.mark.shardloop(shards=2)
async def test_results_of_every_kind_come_back_whole() -> None:
    for value in [None, (1, 2), [3], {"k": 4}, StopAsyncIteration, 0]:
        assert await shard.submit_to(1, lambda v=value: v) == value


@pytest.mark.shardloop(shards=2)
async def test_an_error_is_raised_and_held() -> None:
    future = shard.submit_to(1, fail, "bad")
    with pytest.raises(ValueError, match="bad") as raised:
        await future
    assert raised.value.__notes__ == ["raised on shard 1"]
    assert future.exception() is raised.value
    with pytest.raises(ValueError):
        future.result()


@pytest.mark.shardloop(shards=2)
async def test_gather_wait_for_shield_wait_and_task_groups_take_it() -> None:
    assert await asyncio.gather(*(shard.submit_to(1, add, i) for i in range(50))) == list(
        range(1, 51)
    )
    results = await asyncio.gather(shard.submit_to(1, fail, "x"), return_exceptions=True)
    assert isinstance(results[0], ValueError)
    assert await asyncio.wait_for(shard.submit_to(1, add, 2), 5) == 3
    assert await asyncio.shield(shard.submit_to(1, add, 3)) == 4
    done, pending = await asyncio.wait([shard.submit_to(1, add, 4), shard.submit_to(1, add, 5)])
    assert not pending and sorted(f.result() for f in done) == [5, 6]
    assert [await f for f in asyncio.as_completed([shard.submit_to(1, add, 6)])] == [7]
    async with asyncio.TaskGroup() as group:
        task = group.create_task(asyncio.wait_for(shard.submit_to(1, add, 7), 5))
    assert task.result() == 8
    # A task may be made of it, as of any future.
    assert await asyncio.ensure_future(shard.submit_to(1, add, 8)) == 9


@pytest.mark.shardloop(shards=2)
async def test_a_timeout_cancels_the_call_on_its_shard() -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(shard.submit_to(1, sleeper, "timed out"), 0.05)
    assert await shard.submit_to(1, until, lambda: "timed out" in CANCELLED) is None


@pytest.mark.shardloop(shards=2)
async def test_cancel_cancels_the_call_and_schedules_the_callbacks() -> None:
    future = shard.submit_to(1, sleeper, "cancelled")
    await shard.submit_to(1, until, lambda: "cancelled" in STARTED)
    seen: list[object] = []
    future.add_done_callback(seen.append)
    assert future.cancel("enough")
    assert future.cancelled() and future.done()
    assert not future.cancel()
    assert seen == []  # scheduled, not run inside cancel()
    await asyncio.sleep(0)
    assert seen == [future]
    with pytest.raises(asyncio.CancelledError, match="enough"):
        future.result()
    with pytest.raises(asyncio.CancelledError):
        await future
    assert await shard.submit_to(1, until, lambda: "cancelled" in CANCELLED) is None
    # gather sees the cancellation as it sees an asyncio future's.
    gathered = await asyncio.gather(future, return_exceptions=True)
    assert isinstance(gathered[0], asyncio.CancelledError)


@pytest.mark.shardloop(shards=2)
async def test_a_call_cancelled_on_its_shard_is_cancelled_here() -> None:
    async def cancels_itself() -> None:
        raise asyncio.CancelledError

    future = shard.submit_to(1, cancels_itself)
    with pytest.raises(asyncio.CancelledError):
        await future
    assert future.cancelled()


@pytest.mark.shardloop(shards=2)
async def test_callbacks_run_in_order_in_their_context() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="none")
    seen: list[tuple[str, str]] = []
    future = shard.submit_to(1, add, 1)
    future.add_done_callback(lambda f: seen.append(("first", var.get())))
    var.set("copied")
    future.add_done_callback(lambda f: seen.append(("second", var.get())))
    context = contextvars.copy_context()
    context.run(var.set, "given")
    future.add_done_callback(lambda f: seen.append(("third", var.get())), context=context)
    await future
    await asyncio.sleep(0)
    assert seen == [("first", "none"), ("second", "copied"), ("third", "given")]
    # Added to a done future: scheduled at once.
    future.add_done_callback(lambda f: seen.append(("late", var.get())))
    assert len(seen) == 3
    await asyncio.sleep(0)
    assert seen[-1] == ("late", "copied")


@pytest.mark.shardloop(shards=2)
async def test_remove_done_callback_counts_what_it_removed() -> None:
    future = shard.submit_to(1, add, 1)
    seen: list[str] = []

    def callback(f: object) -> None:
        seen.append("ran")

    future.add_done_callback(callback)
    future.add_done_callback(callback)
    assert future.remove_done_callback(callback) == 2
    assert future.remove_done_callback(callback) == 0
    await future
    await asyncio.sleep(0)
    assert seen == []


@pytest.mark.shardloop(shards=2)
async def test_a_failing_callback_is_reported_and_the_others_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reported: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
    future = shard.submit_to(1, add, 1)
    seen: list[str] = []

    def broken(f: object) -> None:
        raise KeyError("in a callback")

    future.add_done_callback(broken)
    future.add_done_callback(lambda f: seen.append("after"))
    assert await future == 2
    await asyncio.sleep(0)
    assert seen == ["after"]
    assert len(reported) == 1
    assert isinstance(reported[0]["exception"], KeyError)
    assert "Exception in callback" in str(reported[0]["message"])


@pytest.mark.shardloop(shards=2)
async def test_an_error_nobody_retrieved_is_reported_when_the_future_goes() -> None:
    reported: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
    future = shard.submit_to(1, fail, "unseen")
    await asyncio.wait([future])
    del future
    gc.collect()
    assert len(reported) == 1
    assert "never retrieved" in str(reported[0]["message"])
    assert str(reported[0]["exception"]) == "unseen"
    # One that was retrieved is not.
    future = shard.submit_to(1, fail, "seen")
    await asyncio.wait([future])
    assert future.exception() is not None
    del future
    gc.collect()
    assert len(reported) == 1


@pytest.mark.shardloop(shards=2)
async def test_a_task_and_its_pending_call_are_collected_together() -> None:
    future = shard.submit_to(1, sleeper, "collected")

    async def waiter(awaited: ShardFuture[str]) -> None:
        await awaited

    task = asyncio.ensure_future(waiter(future))
    await asyncio.sleep(0.01)
    gone = weakref.ref(task)
    future.cancel()
    await asyncio.sleep(0.01)
    assert task.cancelled()
    del task, future
    gc.collect()
    assert gone() is None


@pytest.mark.shardloop(shards=2)
async def test_the_future_refuses_misuse() -> None:
    future = shard.submit_to(1, add, 1)
    step = future.__await__()
    assert next(step) is future  # yields itself while pending
    assert future._asyncio_future_blocking
    with pytest.raises(RuntimeError, match="await wasn't used with future"):
        next(step)
    with pytest.raises(TypeError):
        ShardFuture()  # type: ignore[call-arg]
    assert await future == 2


def test_off_a_shard_there_is_no_future() -> None:
    with pytest.raises(RuntimeError):
        shard.submit_to(0, add, 1)


@pytest.mark.shardloop(shards=2)
async def test_many_calls_in_flight_are_all_answered_in_order() -> None:
    futures = [shard.submit_to(1, add, i) for i in range(3000)]
    assert [await f for f in futures] == [i + 1 for i in range(3000)]


@pytest.mark.shardloop(shards=2)
async def test_a_logger_does_not_see_a_cancelled_call(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        future = shard.submit_to(1, sleeper, "quiet")
        await asyncio.sleep(0.01)
        future.cancel()
        del future
        gc.collect()
        await asyncio.sleep(0.01)
    assert not caplog.records


@pytest.mark.shardloop(shards=2)
async def test_raising_the_held_error_again_does_not_grow_its_traceback() -> None:
    future = shard.submit_to(1, fail, "again")
    await asyncio.wait([future])
    depths = []
    for _ in range(3):
        try:
            future.result()
        except ValueError as err:
            depths.append(len(traceback.extract_tb(err.__traceback__)))
    assert depths[0] == depths[1] == depths[2], depths


@pytest.mark.shardloop(shards=2)
async def test_a_comparison_that_cancels_the_future_loses_no_callback() -> None:
    future = shard.submit_to(1, sleeper, "compared")

    class CancelsOnCompare:
        def __call__(self, done: object) -> None:
            pass

        def __eq__(self, other: object) -> bool:
            future.cancel()
            return False

        __hash__ = object.__hash__

    async def waiter() -> str:
        try:
            await future
        except asyncio.CancelledError:
            return "woken"
        return "answered"

    task = asyncio.ensure_future(waiter())
    await asyncio.sleep(0)
    future.add_done_callback(CancelsOnCompare())
    assert future.remove_done_callback(print) == 0
    # (asyncio.wait, unlike wait_for, does not wait for a task it gave up on.)
    done, _ = await asyncio.wait([task], timeout=5)
    assert done, "the task awaiting the future was never woken"
    assert task.result() == "woken"


async def waits_forever() -> None:
    STARTED.append("forever")
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        CANCELLED.append("forever")
        raise


def test_a_call_cancelled_while_its_loop_is_stopped_is_cancelled_when_it_runs() -> None:
    loop = shardloop.new_event_loop(2, pin=False, shutdown_timeout=10)
    try:

        async def start() -> ShardFuture[None]:
            future = shard.submit_to(1, waits_forever)
            await shard.submit_to(1, until, lambda: "forever" in STARTED)
            return future

        future = loop.run_until_complete(start())
        assert future.cancel()  # the loop is not running here

        async def cancelled_there() -> None:
            await shard.submit_to(1, until, lambda: "forever" in CANCELLED)

        loop.run_until_complete(cancelled_there())
    finally:
        began = time.monotonic()
        loop.close()
    assert time.monotonic() - began < 5, "close waited for a call whose cancel was lost"
