"""``python -m shardloop bench --scaling``: CPU-bound pure-Python work spread
over 1 and 2 shards with ``invoke_on_all``, on the running interpreter; and,
in a checkout of the repository, the lookup server
(``examples/lookup_server.py``) on 1 and 2 shards under the load generator.

With the GIL the shards take turns; on a free-threaded CPython (3.13t) they
run Python in parallel. Run it under both interpreters to compare.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from . import shard
from ._load import drive, free_port, serving
from ._loop import new_event_loop

LOOKUP_SERVER = Path(__file__).resolve().parents[2] / "examples" / "lookup_server.py"
LOOKUP_SECONDS = 3.0

UNITS = 16
ROUNDS = 3


def unit_of_work(n: int = 200_000) -> int:
    """A pure-Python loop: the kind of work the GIL serialises."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def chunk(units: int) -> int:
    return sum(unit_of_work() for _ in range(units))


async def _rate() -> float:
    count = shard.count()
    start = time.perf_counter()
    await shard.invoke_on_all(chunk, UNITS // count)
    return UNITS / (time.perf_counter() - start)


def measure(shards: int) -> float:
    """Median work units per second over ROUNDS rounds on ``shards`` shards."""

    async def main() -> float:
        await shard.invoke_on_all(chunk, 1)  # warm up
        return statistics.median([await _rate() for _ in range(ROUNDS)])

    with asyncio.Runner(loop_factory=lambda: new_event_loop(shards)) as runner:
        return runner.run(main())


def lookup_rate(shards: int) -> float:
    """Requests/s of the lookup server on `shards` shards of this
    interpreter, overprovisioned (the load generator shares the cores)."""
    port = free_port()
    command = [sys.executable, str(LOOKUP_SERVER), "--port", str(port), "--shards", str(shards)]
    with serving([command], port, env={"SHARDLOOP_OVERPROVISIONED": "1"}):
        report = drive("127.0.0.1", port, "lookup", 64, LOOKUP_SECONDS, progress=False)
    if report["errors"]:
        raise RuntimeError(f"the lookup server failed under load: {report}")
    return float(report["requests_per_second"])


def run_scaling() -> dict[str, Any]:
    one, two = measure(1), measure(2)
    result: dict[str, Any] = {
        "python": sys.version.split()[0],
        "gil": getattr(sys, "_is_gil_enabled", lambda: True)(),
        "units_per_second": {"1 shard": one, "2 shards": two},
        "speedup": two / one,
    }
    if LOOKUP_SERVER.exists():
        lookups = {"1 shard": lookup_rate(1), "2 shards": lookup_rate(2)}
        result["lookup_requests_per_second"] = lookups
        result["lookup_speedup"] = lookups["2 shards"] / lookups["1 shard"]
    return result


def main(as_json: bool) -> None:
    import json

    result = run_scaling()
    if as_json:
        print(json.dumps(result, indent=2))
        return
    gil = "on" if result["gil"] else "off"
    rates = result["units_per_second"]
    print(f"Python {result['python']}, GIL {gil}: CPU-bound work over shards (median of {ROUNDS})")
    for name, rate in rates.items():
        print(f"  {name:10} {rate:8.2f} units/s")
    print(f"  2 shards / 1 shard: {result['speedup']:.2f}x")
    if "lookup_requests_per_second" in result:
        print(
            f"The lookup server under load ({LOOKUP_SECONDS:g}s, 64 connections, "
            "overprovisioned: the load generator shares the cores)"
        )
        for name, rate in result["lookup_requests_per_second"].items():
            print(f"  {name:10} {rate:10,.0f} requests/s")
        print(f"  2 shards / 1 shard: {result['lookup_speedup']:.2f}x")
