"""Stall reports: a shard that runs Python too long without going back to
its loop is reported through logging, with its stack, and counted."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import pytest
import shardloop
from conftest import run2
from shardloop import shard


def stall_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "shardloop" and "stall" in r.getMessage()
    ]


def busy_for(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


async def a_coroutine_that_blocks(seconds: float) -> None:
    await asyncio.sleep(0)
    busy_for(seconds)


def shard_stats(shard_id: int) -> dict[str, Any]:
    return shardloop.stats()["shards"][shard_id]


def test_a_plain_function_that_blocks_is_reported_by_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="shardloop")

    async def main() -> dict[str, Any]:
        await shard.submit_to(1, time.sleep, 0.15)
        await asyncio.sleep(0.05)  # the watchdog sees the end
        return shard_stats(1)

    stats = run2(main(), stall_threshold=0.02)
    records = stall_records(caplog)
    caught = [m for m in records if m.startswith("shard 1 stalled")]
    assert len(caught) == 1, records
    assert "serving time.sleep()" in caught[0]
    assert "its stack:" in caught[0]
    ended = [m for m in records if m.startswith("shard 1: the stall ended after")]
    assert len(ended) == 1, records
    assert float(ended[0].split("after ")[1].split(" ms")[0]) >= 150
    assert stats["stalls"] == 1
    assert stats["worst_stall_seconds"] >= 0.15


def test_a_coroutine_that_blocks_is_reported_with_its_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="shardloop")

    async def main() -> None:
        await shard.submit_to(1, a_coroutine_that_blocks, 0.15)
        await asyncio.sleep(0.05)

    run2(main(), stall_threshold=0.02)
    caught = [m for m in stall_records(caplog) if m.startswith("shard 1 stalled")]
    assert len(caught) == 1, stall_records(caplog)
    assert "serving" not in caught[0].splitlines()[0]
    assert "in a_coroutine_that_blocks" in caught[0]
    assert "in busy_for" in caught[0]


def test_shard_zero_blocking_in_main_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shardloop")

    async def main() -> int:
        busy_for(0.1)
        await asyncio.sleep(0.05)
        return int(shard_stats(0)["stalls"])

    assert run2(main(), stall_threshold=0.02) >= 1
    caught = [m for m in stall_records(caplog) if m.startswith("shard 0 stalled")]
    assert caught and "in main" in caught[0], stall_records(caplog)


def test_nothing_is_reported_when_nothing_stalls_or_when_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="shardloop")

    async def idle_and_calls() -> list[int]:
        for _ in range(200):
            await shard.submit_to(1, abs, -1)
        await asyncio.sleep(0.2)  # idle: every shard sleeps
        return [s["stalls"] for s in shardloop.stats()["shards"]]

    assert run2(idle_and_calls(), stall_threshold=0.05) == [0, 0]

    async def blocks() -> list[int]:
        await shard.submit_to(1, time.sleep, 0.1)
        return [s["stalls"] for s in shardloop.stats()["shards"]]

    assert run2(blocks(), stall_threshold=None) == [0, 0]
    assert stall_records(caplog) == []


@pytest.mark.parametrize(
    ("threshold", "error"),
    [
        (0, ValueError),
        (-0.5, ValueError),
        (math.nan, ValueError),
        (1e9, ValueError),
        ("0.1", TypeError),
        (True, TypeError),
    ],
)
def test_a_bad_stall_threshold_is_refused(threshold: Any, error: type) -> None:
    main = asyncio.sleep(0)
    with pytest.raises(error, match="stall_threshold"):
        shardloop.run(main, shards=1, pin=False, stall_threshold=threshold)
    main.close()
