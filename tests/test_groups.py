"""Service groups (bounded cross-shard calls), Sharded services in a group,
map_reduce over the shards, and the cross-shard Gate."""

from __future__ import annotations

import asyncio
import operator
from typing import Any

import pytest
import shardloop
from conftest import run2
from shardloop import DEFAULT_MAX_INFLIGHT, Gate, GateClosedError, ServiceGroup, Sharded, shard


def pair(group: str, origin: int, target: int) -> dict[str, Any]:
    found = [
        p
        for p in shardloop.stats()["groups"]
        if (p["group"], p["from"], p["to"]) == (group, origin, target)
    ]
    assert len(found) == 1, shardloop.stats()["groups"]
    return found[0]


RUNNING = {"now": 0, "most": 0}
ORDER: list[int] = []


async def counted(x: int) -> int:
    RUNNING["now"] += 1
    RUNNING["most"] = max(RUNNING["most"], RUNNING["now"])
    await asyncio.sleep(0.001)
    RUNNING["now"] -= 1
    return x * x


def record(x: int) -> int:
    ORDER.append(x)
    return x


def test_a_group_bounds_the_calls_in_flight_per_pair_and_keeps_their_order() -> None:
    group = ServiceGroup(4, name="bounded")
    RUNNING.update(now=0, most=0)
    ORDER.clear()

    async def main() -> tuple[list[int], dict[str, Any], dict[str, Any]]:
        results = list(await asyncio.gather(*(group.submit_to(1, counted, i) for i in range(100))))
        one_at_a_time = ServiceGroup(1, name="serial")
        await asyncio.gather(*(one_at_a_time.submit_to(1, record, i) for i in range(50)))
        return results, pair("bounded", 0, 1), pair("serial", 0, 1)

    results, bounded, serial = run2(main())
    assert results == [i * i for i in range(100)]
    assert RUNNING["most"] == 4, "the bound was not reached, or was passed"
    assert ORDER == list(range(50)), "waiting calls were sent out of order"
    assert bounded["max_inflight"] == 4
    assert (bounded["sent"], bounded["in_flight"], bounded["waiting"]) == (100, 0, 0)
    assert bounded["waited"] == 96
    assert 0 < bounded["max_wait_seconds"] <= bounded["wait_seconds"]
    assert serial["waited"] == 49


@pytest.mark.shardloop(shards=2)
async def test_plain_submit_to_is_bounded_by_the_default_group() -> None:
    extra = 100
    calls = [shard.submit_to(1, operator.neg, i) for i in range(DEFAULT_MAX_INFLIGHT + extra)]
    # Before this coroutine yields: the bound went out, the rest waits.
    at_once = dict(pair("default", 0, 1))
    results = list(await asyncio.gather(*calls))
    assert at_once["max_inflight"] == DEFAULT_MAX_INFLIGHT
    assert (at_once["in_flight"], at_once["waiting"]) == (DEFAULT_MAX_INFLIGHT, extra)
    assert results == [-i for i in range(DEFAULT_MAX_INFLIGHT + extra)]


@pytest.mark.shardloop(shards=2)
async def test_a_waiting_call_that_is_cancelled_is_never_sent() -> None:
    group = ServiceGroup(1, name="cancel")
    ORDER.clear()
    first = group.submit_to(1, asyncio.sleep, 0.05)
    waiting = [group.submit_to(1, record, i) for i in range(3)]
    waiting[1].cancel()
    outcomes = await asyncio.gather(first, *waiting, return_exceptions=True)
    stats = pair("cancel", 0, 1)
    assert outcomes[0] is None and outcomes[1] == 0 and outcomes[3] == 2
    assert isinstance(outcomes[2], asyncio.CancelledError)
    assert ORDER == [0, 2], "the cancelled call ran on its target"
    assert (stats["sent"], stats["in_flight"], stats["waiting"]) == (3, 0, 0)


def test_a_waiting_call_still_goes_out_during_the_shutdown_grace_period() -> None:
    outcomes: list[Any] = []

    async def caller() -> None:
        group = ServiceGroup(1, name="late")
        first = group.submit_to(0, asyncio.sleep, 0.1, "slept")
        waiting = group.submit_to(0, abs, -1)
        outcomes.extend([await first, await waiting])

    async def main() -> None:
        shard.submit_to(1, caller)
        # main() returns while shard 0 serves `first` and `waiting` waits
        # (a call that reaches shard 0 in the very turn main() returns is
        # still cancelled there by asyncio.Runner: see README).
        await asyncio.sleep(0.02)

    run2(main())
    assert outcomes == ["slept", 1]


def test_a_group_calls_every_shard_and_reports_errors_as_submit_to_does() -> None:
    group = ServiceGroup(2)
    assert group.name.startswith("group-")
    assert repr(group) == f"ServiceGroup(max_inflight=2, name={group.name!r})"

    async def main() -> tuple[list[int], list[int]]:
        with pytest.raises(ValueError, match="shard 7 does not exist"):
            group.submit_to(7, abs, 1)
        with pytest.raises(ZeroDivisionError) as raised:
            await group.submit_to(1, operator.truediv, 1, 0)
        assert "raised on shard 1" in raised.value.__notes__
        return await group.invoke_on_all(shard.id), await group.invoke_on_others(shard.id)

    assert run2(main(), shards=3) == ([0, 1, 2], [1, 2])
    with pytest.raises(RuntimeError, match="shard"):
        group.submit_to(0, abs, 1)


@pytest.mark.parametrize(
    ("bound", "error", "message"),
    [
        (0, ValueError, "at least 1"),
        (-3, ValueError, "at least 1"),
        (2.0, TypeError, "must be an int, not float"),
        (True, TypeError, "must be an int, not bool"),
        ("8", TypeError, "must be an int, not str"),
    ],
)
def test_a_group_needs_a_positive_int_bound(bound: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ServiceGroup(bound)


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def add(self, n: int) -> int:
        self.value += n
        return shard.id()


def test_a_sharded_service_calls_through_its_group() -> None:
    group = ServiceGroup(8, name="counters")

    async def main() -> tuple[list[int], list[int], int, list[str]]:
        counters = await Sharded(Counter, group=group).start()
        try:
            everywhere = await counters.invoke_on_all("add", 1)
            others = await counters.invoke_on_others("add", 2)
            total = await counters.map_reduce(lambda c: c.value, operator.add, 0)
        finally:
            await counters.stop()
        return everywhere, others, total, sorted({p["group"] for p in shardloop.stats()["groups"]})

    everywhere, others, total, groups = run2(main(), shards=3)
    assert (everywhere, others, total) == ([0, 1, 2], [1, 2], 3 + 2 * 2)
    assert "counters" in groups
    with pytest.raises(TypeError, match="group must be a ServiceGroup, not int"):
        Sharded(Counter, group=3)  # type: ignore[arg-type]


@pytest.mark.shardloop(shards=3)
async def test_map_reduce_over_the_shards() -> None:
    async def doubled_id() -> int:
        await asyncio.sleep(0)
        return 2 * shard.id()

    assert await shard.map_reduce(doubled_id, operator.add, 1) == 1 + 0 + 2 + 4
    assert await shard.map_reduce(shard.id, lambda acc, i: [*acc, i], []) == [0, 1, 2]


@pytest.mark.shardloop(shards=2)
async def test_a_gate_waits_for_the_work_inside_it_on_every_shard() -> None:
    gate = Gate()
    finished: list[int] = []

    async def work(seconds: float) -> None:
        with gate.hold():
            await asyncio.sleep(seconds)
            finished.append(shard.id())

    started = [shard.submit_to(i, work, 0.05 * (i + 1)) for i in range(2)]
    await asyncio.sleep(0.01)
    assert gate.count() == 1  # this shard's
    await gate.close()
    assert sorted(finished) == [0, 1], "close() returned before the work inside left"
    with pytest.raises(GateClosedError):
        gate.enter()
    await asyncio.gather(*started)
    assert gate.closed


@pytest.mark.shardloop(shards=2)
async def test_a_gate_refuses_a_leave_without_an_enter() -> None:
    gate = Gate()
    gate.enter()
    gate.leave()
    with pytest.raises(RuntimeError, match="without a matching enter"):
        gate.leave()
    await gate.close()  # nothing inside: at once
