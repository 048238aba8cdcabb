"""Calls into a background runtime from threads that are not shards and
from other event loops (shardloop.start)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import shardloop
from shardloop import shard

ROOT = Path(__file__).resolve().parent.parent


def where(x: int) -> tuple[int, int]:
    return x * 2, shard.id()


CANCELLED = threading.Event()


async def waits_long() -> None:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        CANCELLED.set()
        raise


def test_threads_send_work_to_shards_and_get_futures() -> None:
    with shardloop.start(shards=2, pin=False) as rt:
        assert rt.shard_count == 2
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: rt.submit_to(i % 2, where, i).result(10), range(8)))
        assert results == [(i * 2, i % 2) for i in range(8)]
        assert rt.invoke_on_all(shard.id).result(10) == [0, 1]
        assert [s["shard"] for s in rt.stats()["shards"]] == [0, 1]


def test_another_event_loop_awaits_calls_and_cancels_them() -> None:
    CANCELLED.clear()

    async def elsewhere(rt: shardloop.Runtime) -> tuple[int, int]:
        answer = await rt.call(1, where, 21)
        waiting = asyncio.ensure_future(rt.call(1, waits_long))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return answer

    with shardloop.start(shards=2, pin=False) as rt:
        assert asyncio.run(elsewhere(rt)) == (42, 1)
        assert CANCELLED.wait(10), "the call on shard 1 was not cancelled"


def test_errors_are_those_of_submit_to() -> None:
    rt = shardloop.start(shards=2, pin=False)
    try:
        with pytest.raises(ValueError, match="shard 2 does not exist: the runtime has 2 shards"):
            rt.submit_to(2, where, 1)
        with pytest.raises(TypeError, match="the shard must be an int"):
            rt.submit_to("1", where, 1)  # type: ignore[arg-type]
        with pytest.raises(ZeroDivisionError) as raised:
            rt.submit_to(1, divmod, 1, 0).result(10)
        assert "raised on shard 1" in raised.value.__notes__
        # A shard cannot close its own runtime (it would wait for itself).
        with pytest.raises(RuntimeError, match="cannot be closed from a shard"):
            rt.submit_to(1, rt.close).result(10)
    finally:
        rt.close()
    rt.close()  # again: nothing
    with pytest.raises(shardloop.ShutdownError):
        rt.submit_to(0, where, 1)
    assert "closed" in repr(rt)


def test_a_runtime_stopped_by_system_exit_raises_it_at_close() -> None:
    rt = shardloop.start(shards=2, pin=False)
    with pytest.raises(SystemExit):
        rt.submit_to(1, sys.exit, 3).result(10)
    with pytest.raises(SystemExit) as raised:
        rt.close()
    assert raised.value.code == 3


def test_a_runtime_that_cannot_start_raises_at_once() -> None:
    with pytest.raises(ValueError, match="shards must be at least 1"):
        shardloop.start(shards=0)


def test_the_example_sends_work_from_a_thread_pool_and_another_loop() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "from_threads.py"), "--requests", "200"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "thread pool: 200 puts, per shard [" in out, out
    per_shard = [int(n) for n in out.split("per shard [")[1].split("]")[0].split(",")]
    assert sum(per_shard) == 200 and all(n > 0 for n in per_shard), out
    assert "read back: ['name-0', 'name-40', 'name-80', 'name-120', 'name-160']" in out, out
