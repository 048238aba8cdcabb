"""``python -m shardloop load``: drives an echo or lookup server with many
connections for a fixed time and reports requests/s and latency.

Each connection sends a request, waits for the whole answer, and sends the
next (a closed loop). The generator runs in its own process, on uvloop when
it is installed, and prints a progress line every second.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

PROTOCOLS = ("echo", "lookup")


@dataclass
class Report:
    protocol: str
    connections: int
    seconds: float
    requests: int = 0
    errors: int = 0
    latencies_ns: list[int] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        """The p-th percentile latency, in microseconds."""
        if not self.latencies_ns:
            return float("nan")
        ordered = sorted(self.latencies_ns)
        index = min(len(ordered) - 1, int(p / 100 * len(ordered)))
        return ordered[index] / 1000

    def summary(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "connections": self.connections,
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "errors": self.errors,
            "requests_per_second": round(self.requests / self.seconds) if self.seconds else 0,
            "p50_us": round(self.percentile(50), 1),
            "p99_us": round(self.percentile(99), 1),
            "p999_us": round(self.percentile(99.9), 1),
        }


async def _client(
    host: str, port: int, protocol: str, size: int, deadline: float, report: Report, keys: int
) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        report.errors += 1
        return
    payload = bytes(size)
    rng = random.Random()
    clock = time.perf_counter_ns
    latencies = report.latencies_ns
    try:
        while time.monotonic() < deadline:
            start = clock()
            if protocol == "echo":
                writer.write(payload)
                await reader.readexactly(size)
            else:
                writer.write(struct.pack("!I", rng.randrange(keys)))
                (length,) = struct.unpack("!I", await reader.readexactly(4))
                await reader.readexactly(length)
            latencies.append(clock() - start)
            report.requests += 1
    except (OSError, asyncio.IncompleteReadError):
        report.errors += 1
    finally:
        writer.close()


async def _progress(report: Report, start: float, seconds: float) -> None:
    last = 0
    while True:
        await asyncio.sleep(1)
        done = report.requests
        elapsed = time.monotonic() - start
        print(
            f"\r  {elapsed:4.1f}/{seconds:.0f}s  {done - last:>9,} req/s  {done:>11,} requests",
            end="",
            file=sys.stderr,
            flush=True,
        )
        last = done


async def drive(
    host: str,
    port: int,
    protocol: str = "lookup",
    connections: int = 64,
    seconds: float = 5.0,
    size: int = 64,
    keys: int = 100_000,
    progress: bool = True,
) -> Report:
    """Runs the load and returns its report."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    report = Report(protocol, connections, seconds)
    start = time.monotonic()
    ticker = asyncio.create_task(_progress(report, start, seconds)) if progress else None
    await asyncio.gather(
        *(
            _client(host, port, protocol, size, start + seconds, report, keys)
            for _ in range(connections)
        )
    )
    report.seconds = time.monotonic() - start
    if ticker is not None:
        ticker.cancel()
        print(file=sys.stderr)
    return report


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shardloop load", description=__doc__)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="lookup")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=64, help="echo payload bytes")
    parser.add_argument("--keys", type=int, default=100_000, help="lookup ids drawn from 0..keys")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    report = runner(
        drive(
            args.host,
            args.port,
            args.protocol,
            args.connections,
            args.seconds,
            args.size,
            args.keys,
            progress=not args.json,
        )
    )
    summary = report.summary()
    if args.json:
        print(json.dumps(summary))
        return
    print(
        f"{summary['protocol']}: {summary['requests_per_second']:,} requests/s over "
        f"{summary['connections']} connections, {summary['seconds']}s; latency p50 "
        f"{summary['p50_us']} us, p99 {summary['p99_us']} us, p999 {summary['p999_us']} us; "
        f"errors {summary['errors']}"
    )
