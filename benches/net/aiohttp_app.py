"""An aiohttp application on one shard of shardloop, on uvloop and on stock
asyncio: what a framework built on asyncio's transports (`loop.create_server`
and a Protocol) gets from each loop.

    python benches/net/aiohttp_app.py [--seconds 3] [--rounds 3] [--connections 50]

The server is alone on core 0 (`taskset`), `wrk` alone on core 1; the
shard sleeps as soon as it is idle (`idle_poll=0`), so its CPU time is its
work. Needs `aiohttp` and `wrk` (Debian's package); prints requests/s and
the server's CPU per request (utime+stime from /proc), median of the
rounds, and the ratios to uvloop.

    python benches/net/aiohttp_app.py --serve LOOP --port PORT   (one server)
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tools"))
sys.path.insert(0, str(HERE))
from cpu import cpu_seconds  # noqa: E402  (benches/net, put on the path above)
from loadgen import free_port, serving  # noqa: E402  (tools/, put on the path above)

LOOPS = ("shardloop", "uvloop", "asyncio")


async def serve(port: int) -> None:
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="Hello, world")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def run_server(loop: str, port: int) -> None:
    if loop == "shardloop":
        import shardloop

        shardloop.run(serve(port), shards=1, idle_poll=0)
    elif loop == "uvloop":
        import uvloop

        uvloop.run(serve(port))
    else:
        asyncio.run(serve(port))


def measure(loop: str, seconds: float, connections: int) -> tuple[float, float]:
    """(requests/s, server CPU us per request) of one round."""
    port = free_port()
    server = ["taskset", "-c", "0", sys.executable, __file__, "--serve", loop, "--port", str(port)]
    with serving([server], port) as procs:
        before = cpu_seconds(procs[0].pid)
        wrk = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s"]
        out = subprocess.run(
            [*wrk, f"http://127.0.0.1:{port}/"],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
        used = cpu_seconds(procs[0].pid) - before
    found = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if found is None or errors is not None:
        raise RuntimeError(f"wrk failed against {loop}:\n{out}")
    requests = int(found.group(1))
    return requests / seconds, used / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--serve", choices=LOOPS)
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.serve:
        run_server(args.serve, args.port)
        return
    rounds: dict[str, list[tuple[float, float]]] = {loop: [] for loop in LOOPS}
    for _ in range(args.rounds):
        for loop in LOOPS:  # interleaved, so that drift hits every loop alike
            rounds[loop].append(measure(loop, args.seconds, args.connections))
    medians = {
        loop: (
            statistics.median(r for r, _ in results),
            statistics.median(c for _, c in results),
        )
        for loop, results in rounds.items()
    }
    print(f"aiohttp hello, 1 core, wrk -c{args.connections}, median of {args.rounds} rounds")
    for loop, (rate, cpu) in medians.items():
        each = " / ".join(f"{r:,.0f}" for r, _ in rounds[loop])
        print(f"{loop:10} {rate:>9,.0f} req/s  {cpu:6.2f} us CPU per request  (rounds: {each})")
    base_rate, base_cpu = medians["uvloop"]
    for loop in ("shardloop", "asyncio"):
        rate, cpu = medians[loop]
        ratios = f"{rate / base_rate:.2f}x req/s, {cpu / base_cpu:.2f}x CPU per request"
        print(f"{loop} / uvloop: {ratios}")


if __name__ == "__main__":
    main()
