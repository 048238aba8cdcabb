"""Rust futures awaited from Python, and Python awaitables driven from Rust,
on a shard."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import run2
from shardloop import _shardloop, shard


async def timed_rust_sleep(delay: float) -> tuple[float, int]:
    start = time.perf_counter()
    await _shardloop.sleep(delay)
    return time.perf_counter() - start, shard.id()


def test_a_rust_timer_awaited_from_python_on_every_shard() -> None:
    async def main() -> list[tuple[float, int]]:
        return await shard.invoke_on_all(timed_rust_sleep, 0.02)

    results = run2(main())
    assert [on for _, on in results] == [0, 1]
    assert all(elapsed >= 0.02 for elapsed, _ in results)


async def relay_on_shard() -> tuple[str, int]:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.01, future.set_result, "later")
    return await _shardloop.relay(future), shard.id()


def test_a_python_future_driven_from_a_rust_task() -> None:
    async def main() -> tuple[tuple[str, int], tuple[str, int]]:
        return await relay_on_shard(), await shard.submit_to(1, relay_on_shard)

    assert run2(main()) == (("later", 0), ("later", 1))


def test_errors_and_cancellation_cross_the_bridge() -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise KeyError("inside")

    async def main() -> None:
        with pytest.raises(KeyError, match="inside"):
            await _shardloop.relay(fails())
        pending = asyncio.ensure_future(asyncio.sleep(10))
        relayed = _shardloop.relay(pending)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await relayed

    run2(main())


def test_the_bridge_needs_a_shard() -> None:
    async def main() -> None:
        await _shardloop.sleep(0)

    with pytest.raises(RuntimeError, match=r"shardloop\.run"):
        asyncio.run(main())
