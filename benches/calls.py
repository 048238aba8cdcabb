"""Cross-shard calls against today's ways (``make bench-python``).

    python benches/calls.py [--json]

On 2 shards: ``submit_to`` of a plain function and of a coroutine function,
one call at a time (round trip) and 1,000 in flight (collected with
``asyncio.gather``, or awaited one by one in order), measured in the same run
as the same calls between two asyncio loops (and two uvloop loops, when
uvloop is installed) on two threads, with ``run_coroutine_threadsafe`` and
``call_soon_threadsafe``. Each figure is the median of several rounds.

Placement is the same for every contender: the calling loop runs on CPU 0
and the remote one on CPU 1 (shardloop pins its shards so; the peers' two
threads are pinned here). ``--placement same`` puts both peer threads on
CPU 0 instead, for comparison: a cross-thread wake-up then costs no
cross-core interrupt, which flatters the peers' one-call-at-a-time figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shardloop import new_event_loop, shard

ROUNDS = 5
SEQUENTIAL_CALLS = 5_000
IN_FLIGHT = 1_000
IN_FLIGHT_BATCHES = 10


def work(x: int) -> int:
    return x + 1


async def async_work(x: int) -> int:
    return x + 1


Caller = Callable[[int], Awaitable[Any]]


async def _rate_sequential(call: Caller) -> float:
    start = time.perf_counter()
    for i in range(SEQUENTIAL_CALLS):
        await call(i)
    return SEQUENTIAL_CALLS / (time.perf_counter() - start)


async def _rate_in_flight_gather(call: Caller) -> float:
    """IN_FLIGHT calls sent at once, collected with asyncio.gather."""
    start = time.perf_counter()
    for _ in range(IN_FLIGHT_BATCHES):
        await asyncio.gather(*[call(i) for i in range(IN_FLIGHT)])
    return IN_FLIGHT * IN_FLIGHT_BATCHES / (time.perf_counter() - start)


async def _rate_in_flight_ordered(call: Caller) -> float:
    """IN_FLIGHT calls sent at once, then awaited one by one in order."""
    start = time.perf_counter()
    for _ in range(IN_FLIGHT_BATCHES):
        for pending in [call(i) for i in range(IN_FLIGHT)]:
            await pending
    return IN_FLIGHT * IN_FLIGHT_BATCHES / (time.perf_counter() - start)


async def _measure(callers: dict[str, Caller]) -> dict[str, float]:
    """Median calls/s of every (caller, pattern) over ROUNDS rounds."""
    samples: dict[str, list[float]] = {}
    for _ in range(ROUNDS):
        for name, call in callers.items():
            await call(0)  # warm up
            samples.setdefault(f"{name}/sequential", []).append(await _rate_sequential(call))
            samples.setdefault(f"{name}/in_flight_gather", []).append(
                await _rate_in_flight_gather(call)
            )
            samples.setdefault(f"{name}/in_flight_ordered", []).append(
                await _rate_in_flight_ordered(call)
            )
    return {key: statistics.median(values) for key, values in samples.items()}


STALL_THRESHOLD: float | None = 0.025


def _bench_shardloop() -> dict[str, float]:
    async def main() -> dict[str, float]:
        return await _measure(
            {
                "plain": lambda i: shard.submit_to(1, work, i),
                "coroutine": lambda i: shard.submit_to(1, async_work, i),
            }
        )

    def factory() -> asyncio.AbstractEventLoop:
        if STALL_THRESHOLD == 0.025:  # the default (a build without the option too)
            return new_event_loop(2)
        return new_event_loop(2, stall_threshold=STALL_THRESHOLD)

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


PLACEMENT = "split"


def _peer_cpus() -> tuple[set[int], set[int]]:
    """The CPUs of the peers' calling thread and remote thread."""
    cpus = sorted(os.sched_getaffinity(0))
    if PLACEMENT == "same" or len(cpus) < 2:
        return {cpus[0]}, {cpus[0]}
    return {cpus[0]}, {cpus[1]}


def _bench_threads(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> dict[str, float]:
    """Two event loops on two threads, the way it is done without shardloop."""
    remote = loop_factory()
    started = threading.Event()
    here_cpus, remote_cpus = _peer_cpus()
    allowed = os.sched_getaffinity(0)

    def serve() -> None:
        os.sched_setaffinity(0, remote_cpus)
        asyncio.set_event_loop(remote)
        remote.call_soon(started.set)
        remote.run_forever()

    thread = threading.Thread(target=serve, name="remote-loop", daemon=True)
    thread.start()
    started.wait()

    async def main() -> dict[str, float]:
        here = asyncio.get_running_loop()

        def call_soon(i: int) -> asyncio.Future[int]:
            future: asyncio.Future[int] = here.create_future()

            def run() -> None:
                here.call_soon_threadsafe(future.set_result, work(i))

            remote.call_soon_threadsafe(run)
            return future

        def run_coroutine(i: int) -> asyncio.Future[int]:
            return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(async_work(i), remote))

        return await _measure(
            {"call_soon_threadsafe": call_soon, "run_coroutine_threadsafe": run_coroutine}
        )

    os.sched_setaffinity(0, here_cpus)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(main())
    finally:
        os.sched_setaffinity(0, allowed)
        remote.call_soon_threadsafe(remote.stop)
        thread.join()
        remote.close()


def run_benchmarks() -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "gil": getattr(sys, "_is_gil_enabled", lambda: True)(),
            "peer_placement": PLACEMENT,
        },
        "calls_per_second": {},
    }
    rates = results["calls_per_second"]
    rates.update({f"shardloop/{k}": v for k, v in _bench_shardloop().items()})
    rates.update({f"asyncio/{k}": v for k, v in _bench_threads(asyncio.new_event_loop).items()})
    try:
        import uvloop
    except ImportError:
        results["uvloop"] = "not installed"
    else:
        rates.update({f"uvloop/{k}": v for k, v in _bench_threads(uvloop.new_event_loop).items()})
    base = rates["asyncio/run_coroutine_threadsafe/sequential"]
    results["ratios"] = {
        "plain sequential vs asyncio run_coroutine_threadsafe": rates["shardloop/plain/sequential"]
        / base,
        "coroutine sequential vs asyncio run_coroutine_threadsafe": rates[
            "shardloop/coroutine/sequential"
        ]
        / base,
        "plain sequential vs asyncio call_soon_threadsafe": rates["shardloop/plain/sequential"]
        / rates["asyncio/call_soon_threadsafe/sequential"],
        "plain in flight (gather) vs asyncio call_soon_threadsafe": rates[
            "shardloop/plain/in_flight_gather"
        ]
        / rates["asyncio/call_soon_threadsafe/in_flight_gather"],
        "plain in flight (ordered) vs asyncio call_soon_threadsafe": rates[
            "shardloop/plain/in_flight_ordered"
        ]
        / rates["asyncio/call_soon_threadsafe/in_flight_ordered"],
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print a machine-readable summary")
    parser.add_argument(
        "--stall-threshold",
        default="0.025",
        help="the shards' stall_threshold in seconds, or 'off' (default 0.025, as run())",
    )
    parser.add_argument(
        "--placement",
        choices=["split", "same"],
        default="split",
        help="the peers' two threads on CPUs 0 and 1 (split, as the shards) or both on CPU 0",
    )
    args = parser.parse_args()
    global STALL_THRESHOLD, PLACEMENT
    PLACEMENT = args.placement
    STALL_THRESHOLD = None if args.stall_threshold == "off" else float(args.stall_threshold)
    results = run_benchmarks()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    machine = results["machine"]
    gil = "on" if machine["gil"] else "off"
    print(f"{machine['cpus']} CPUs, Python {machine['python']}, GIL {gil}")
    where = "CPU 0 and CPU 1" if PLACEMENT == "split" else "both on CPU 0"
    print(f"shards pinned to CPU 0 and CPU 1; the peers' two threads {where}")
    print(f"median of {ROUNDS} rounds; sequential = one call at a time, ", end="")
    print(f"in_flight = {IN_FLIGHT} at once\n")
    for name, rate in results["calls_per_second"].items():
        print(f"  {name:48} {rate:>14,.0f} calls/s")
    print()
    for name, ratio in results["ratios"].items():
        print(f"  {name:60} {ratio:6.1f}x")


if __name__ == "__main__":
    main()
