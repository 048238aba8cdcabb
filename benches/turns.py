"""The event loop's own turn on one core: asyncio, uvloop and a shard loop.

    python benches/turns.py [--rounds 5] [--count 200000]

Three loops of the same process, one after the other, each on CPU 0
(``sched_setaffinity``), the shard loop with ``idle_poll=0`` and no stall
watchdog. What each figure counts:

- ``sleep(0)``: a task that awaits ``asyncio.sleep(0)`` in a loop: one task
  step and one turn of the loop per iteration.
- ``call_soon chain``: a callback that schedules itself with ``call_soon``:
  one callback and one turn of the loop per iteration.
- ``call_later + cancel``: timers made with ``call_later`` and cancelled
  (a timeout that did not fire: ``asyncio.timeout``, ``wait_for``).

Each figure is the median of ``--rounds`` rounds, per second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable

import shardloop

COUNT = 200_000


async def sleep_zero(count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        await asyncio.sleep(0)
    return count / (time.perf_counter() - start)


async def call_soon_chain(count: int) -> float:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = count

    def step() -> None:
        nonlocal left
        left -= 1
        if left:
            loop.call_soon(step)
        else:
            done.set_result(None)

    start = time.perf_counter()
    loop.call_soon(step)
    await done
    return count / (time.perf_counter() - start)


async def timers_cancelled(count: int) -> float:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    timers = [loop.call_later(3600, print) for _ in range(count)]
    for timer in timers:
        timer.cancel()
    took = time.perf_counter() - start
    await asyncio.sleep(0)  # the heap drops them in the next turn
    return count / took


PATTERNS = {
    "sleep(0)": sleep_zero,
    "call_soon chain": call_soon_chain,
    "call_later + cancel": timers_cancelled,
}


def measure(
    factory: Callable[[], asyncio.AbstractEventLoop], rounds: int, count: int
) -> dict[str, float]:
    async def main() -> dict[str, list[float]]:
        samples: dict[str, list[float]] = {name: [] for name in PATTERNS}
        for _ in range(rounds):
            for name, pattern in PATTERNS.items():
                samples[name].append(await pattern(count))
        return samples

    with asyncio.Runner(loop_factory=factory) as runner:
        samples = runner.run(main())
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=COUNT)
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        print("uvloop is not installed: not measured")
    else:
        loops["uvloop"] = uvloop.new_event_loop
    loops["shardloop"] = lambda: shardloop.new_event_loop(
        1, pin=False, idle_poll=0, stall_threshold=None
    )
    results = {name: measure(factory, args.rounds, args.count) for name, factory in loops.items()}
    print(f"per second, median of {args.rounds} rounds of {args.count:,}; every loop on CPU 0")
    print(f"{'':22}" + "".join(f"{name:>14}" for name in results))
    for pattern in PATTERNS:
        print(f"{pattern:22}" + "".join(f"{r[pattern]:>14,.0f}" for r in results.values()))
    if "uvloop" in results:
        for pattern in PATTERNS:
            ratio = results["shardloop"][pattern] / results["uvloop"][pattern]
            print(f"shardloop / uvloop, {pattern}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
