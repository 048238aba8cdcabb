"""Service groups: what a bound on the calls in flight costs, and what it
buys when a shard floods another with calls it does not await.

    python benches/groups.py [--flood 1000000] [--json]

1. Throughput, 2 shards: 1,000 plain calls in flight (``gather``) and
   sequential round trips, through the default group (plain
   ``submit_to``), through a group whose bound is never reached, and
   through groups of smaller bounds (median of 5 rounds each).
2. A flood, 2 shards: shard 0 sends ``--flood`` plain calls to shard 1
   without awaiting them, then awaits them all, while shard 1 runs a 1 ms
   timer, and one call of another group is sent behind the flood. For
   each bound (a fresh process each): how long that other call took, the
   flood's time, how late shard 1's timer fired at worst, and the
   process's peak RSS growth. "unbounded" is a bound the flood never
   reaches: every call is sent at once, as before groups existed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import shardloop
from shardloop import DEFAULT_MAX_INFLIGHT, ServiceGroup, shard

ROUNDS = 5
IN_FLIGHT = 1_000
SEQUENTIAL = 5_000
BOUNDS = [64, 1024, DEFAULT_MAX_INFLIGHT, 16384]
UNBOUNDED = 1 << 40


def work(x: int) -> int:
    return x + 1


async def _rates(submit: Any) -> tuple[float, float]:
    gather, sequential = [], []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(10):
            await asyncio.gather(*[submit(1, work, i) for i in range(IN_FLIGHT)])
        gather.append(10 * IN_FLIGHT / (time.perf_counter() - start))
        start = time.perf_counter()
        for i in range(SEQUENTIAL):
            await submit(1, work, i)
        sequential.append(SEQUENTIAL / (time.perf_counter() - start))
    return statistics.median(gather), statistics.median(sequential)


def throughput() -> dict[str, dict[str, float]]:
    async def main() -> dict[str, dict[str, float]]:
        ways: dict[str, Any] = {"default group (plain submit_to)": shard.submit_to}
        ways["never-reached bound"] = ServiceGroup(UNBOUNDED).submit_to
        for bound in (64, 256):
            ways[f"bound {bound}"] = ServiceGroup(bound).submit_to
        found = {}
        for name, submit in ways.items():
            gather, sequential = await _rates(submit)
            found[name] = {"in_flight_gather": gather, "sequential": sequential}
        return found

    return shardloop.run(main(), shards=2)


LATE = {"worst": 0.0}


STOP_TICKER: asyncio.Event


def flood_child(calls: int, bound: int) -> dict[str, float]:
    """One flood with `bound`, in this (fresh) process."""
    group = ServiceGroup(bound, name="flood")
    probe = ServiceGroup(1, name="probe")

    async def ticker(until: asyncio.Event) -> None:
        while not until.is_set():
            due = time.perf_counter() + 0.001
            await asyncio.sleep(0.001)
            LATE["worst"] = max(LATE["worst"], time.perf_counter() - due)

    async def start_ticker() -> None:
        global STOP_TICKER
        STOP_TICKER = asyncio.Event()
        asyncio.get_running_loop().create_task(ticker(STOP_TICKER))

    async def stop_ticker() -> float:
        STOP_TICKER.set()
        return LATE["worst"] * 1000

    async def main() -> dict[str, float]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        await shard.submit_to(1, start_ticker)
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        sent = [group.submit_to(1, work, i) for i in range(calls)]
        # Another service's call, sent behind the flood.
        probe_sent = time.perf_counter()
        await probe.submit_to(1, work, 0)
        probe_ms = (time.perf_counter() - probe_sent) * 1000
        await asyncio.gather(*sent)
        elapsed = time.perf_counter() - start
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        late = await shard.submit_to(1, stop_ticker)
        return {
            "seconds": elapsed,
            "peak_rss_growth_mb": grown / 1024,
            "worst_timer_late_ms": late,
            "other_group_call_ms": probe_ms,
        }

    return shardloop.run(main(), shards=2)


def flood(calls: int) -> dict[str, dict[str, float]]:
    found = {}
    for bound in [*BOUNDS, UNBOUNDED]:
        name = "unbounded" if bound == UNBOUNDED else f"bound {bound}"
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(calls), str(bound)],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        ).stdout
        found[name] = json.loads(out)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flood", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(flood_child(*args.child)))
        return
    results = {"throughput": throughput(), "flood": flood(args.flood)}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("calls/s, 2 shards (median of 5)           1,000 in flight (gather)   sequential")
    for name, r in results["throughput"].items():
        print(f"  {name:40} {r['in_flight_gather']:>14,.0f} {r['sequential']:>14,.0f}")
    print(f"a flood of {args.flood:,} un-awaited plain calls, shard 0 to shard 1")
    print("  bound        other group's call   flood   worst timer lateness   peak RSS growth")
    for name, r in results["flood"].items():
        print(
            f"  {name:14} {r['other_group_call_ms']:>12.1f} ms {r['seconds']:>8.2f} s"
            f" {r['worst_timer_late_ms']:>15.1f} ms {r['peak_rss_growth_mb']:>14.0f} MB"
        )


if __name__ == "__main__":
    main()
