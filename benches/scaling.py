"""CPU-bound pure-Python work spread over 1 and 2 shards with
``invoke_on_all``, the same kind of work fanned out the way a new user
writes it (``[shard.submit_to(i % n, burn, per) for i in range(8)]`` from
shard 0, 6M iterations in 8 chunks, best of 3), on the running
interpreter, and the lookup server
(``examples/lookup_server.py``) on 1 and 2 shards under the load generator
(``tools/loadgen.py``).

    python benches/scaling.py [--json]        # or: make bench-scaling

With the GIL the shards take turns; on a free-threaded CPython (3.13t) they
run Python in parallel. Run it under both interpreters to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from shardloop import new_event_loop, shard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from loadgen import drive, free_port, serving  # noqa: E402  (tools/, put on the path above)

LOOKUP_SERVER = ROOT / "examples" / "lookup_server.py"
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


FAN_OUT_ITERATIONS = 6_000_000
FAN_OUT_CHUNKS = 8


def burn(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i & 7
    return total


def fan_out_seconds(shards: int) -> float:
    """Best of ROUNDS: seconds for the fan-out written the obvious way."""

    async def once() -> float:
        n = shard.count()
        per = FAN_OUT_ITERATIONS // FAN_OUT_CHUNKS
        start = time.perf_counter()
        await asyncio.gather(*[shard.submit_to(i % n, burn, per) for i in range(FAN_OUT_CHUNKS)])
        return time.perf_counter() - start

    async def main() -> float:
        await once()  # warm up
        return min([await once() for _ in range(ROUNDS)])

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
    fan_one, fan_two = fan_out_seconds(1), fan_out_seconds(2)
    result["fan_out_seconds"] = {"1 shard": fan_one, "2 shards": fan_two}
    result["fan_out_speedup"] = fan_one / fan_two
    lookups = {"1 shard": lookup_rate(1), "2 shards": lookup_rate(2)}
    result["lookup_requests_per_second"] = lookups
    result["lookup_speedup"] = lookups["2 shards"] / lookups["1 shard"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print a machine-readable summary")
    args = parser.parse_args()
    result = run_scaling()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    gil = "on" if result["gil"] else "off"
    rates = result["units_per_second"]
    print(f"Python {result['python']}, GIL {gil}: CPU-bound work over shards (median of {ROUNDS})")
    for name, rate in rates.items():
        print(f"  {name:10} {rate:8.2f} units/s")
    print(f"  2 shards / 1 shard: {result['speedup']:.2f}x")
    print(
        f"The fan-out written the obvious way ({FAN_OUT_ITERATIONS:,} iterations in "
        f"{FAN_OUT_CHUNKS} chunks, best of {ROUNDS})"
    )
    for name, seconds in result["fan_out_seconds"].items():
        print(f"  {name:10} {seconds:8.3f} s")
    print(f"  1 shard / 2 shards: {result['fan_out_speedup']:.2f}x")
    print(
        f"The lookup server under load ({LOOKUP_SECONDS:g}s, 64 connections, "
        "overprovisioned: the load generator shares the cores)"
    )
    for name, rate in result["lookup_requests_per_second"].items():
        print(f"  {name:10} {rate:10,.0f} requests/s")
    print(f"  2 shards / 1 shard: {result['lookup_speedup']:.2f}x")


if __name__ == "__main__":
    main()
