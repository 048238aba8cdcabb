"""Server CPU per request: what a request costs the server process, whatever
the client takes, so that scaling can be measured on a machine with fewer
cores than a server and its client need.

    python benches/net/cpu.py [--seconds 3] [--shardloop-python PY] [--json]

For the echo, lookup and memcached examples on 1 and 2 shards (with
``--idle-poll 0``: a shard sleeps as soon as it is idle, so that spinning
is not counted as work), and uvloop in 1 process and 2 processes sharing
the port (SO_REUSEPORT; echo and lookup): the server's utime+stime from
/proc over the load, divided by the requests served. A 1-shard server is
pinned to core 0 and the load generator (``tools/loadgen.py``'s binary) to
core 1; a 2-shard server uses both cores and the load generator shares
them. The ratio 2 shards / 1 shard is what scaling costs per request.

For echo and lookup, the same servers written with asyncio's own API
(``benches/net/baseline_server.py``: a Protocol through
``loop.create_server``, and streams) on a shard loop, on uvloop and on
stock asyncio, each alone on core 0: what a framework built on asyncio's
transports gets from each loop.

For echo, the Rust-core echo example (``examples/echo.rs``, 1 shard, placed
as the 1-shard server) is the floor: what the kernel's loopback TCP and the
runtime's own loop cost, with no Python at all. ``--pipeline N`` has every
connection keep N requests in flight, which spreads the kernel's cost per
request thinner and shows the server's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from loadgen import binary, free_port, serving  # noqa: E402  (tools/, put on the path above)

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rust_echo() -> str:
    """The Rust-core echo example's binary, built if need be."""
    subprocess.run(
        ["cargo", "build", "-q", "--release", "-p", "shardloop-core", "--example", "echo"],
        cwd=ROOT,
        check=True,
    )
    return str(ROOT / "target" / "release" / "examples" / "echo")


def servers(protocol: str, port: int, py: str) -> dict[str, tuple[list[list[str]], str | None]]:
    """name -> (commands, core to pin the server to, or None)."""
    example = [py, str(ROOT / "examples" / f"{protocol}_server.py"), "--port", str(port)]
    quiet = ["--idle-poll", "0"]
    found: dict[str, tuple[list[list[str]], str | None]] = {}
    if protocol == "echo":
        floor = [rust_echo(), "--port", str(port), "--shards", "1", "--idle-poll-us", "0"]
        found["Rust core, 1 shard"] = ([floor], "0")
    found["shardloop, 1 shard"] = ([[*example, "--shards", "1", *quiet]], "0")
    found["shardloop, 2 shards"] = ([[*example, "--shards", "2", *quiet]], None)
    if protocol != "memcached":
        base = [sys.executable, str(HERE / "baseline_server.py"), "--loop", "uvloop"]
        base += ["--protocol", protocol, "--port", str(port)]
        found["uvloop, 1 process"] = ([base], "0")
        found["uvloop, 2 processes"] = ([base, base], None)
        # asyncio's own API (a Protocol through loop.create_server, and
        # streams) on each loop, the server alone on core 0.
        for loop, python in (("shardloop", py), ("uvloop", sys.executable), ("asyncio", py)):
            for api in ("protocol", "streams"):
                if loop == "uvloop" and api == "streams":
                    continue  # the row "uvloop, 1 process" above
                command = [python, str(HERE / "baseline_server.py"), "--loop", loop]
                command += ["--api", api, "--protocol", protocol, "--port", str(port)]
                found[f"{loop} loop, {api}"] = ([command], "0")
    return found


def measure(
    commands: list[list[str]],
    core: str | None,
    protocol: str,
    port: int,
    seconds: float,
    pipeline: int = 1,
):
    pin = ["taskset", "-c", core] if core else []
    # (taskset execs the server: its pid is the server's.)
    with serving([[*pin, *cmd] for cmd in commands], port) as procs:
        before = sum(cpu_seconds(p.pid) for p in procs)
        client = ["taskset", "-c", "1"] if core == "0" else []
        out = subprocess.run(
            [
                *client,
                binary(),
                "--port",
                str(port),
                "--protocol",
                protocol,
                "--seconds",
                str(seconds),
                "--pipeline",
                str(pipeline),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
        used = sum(cpu_seconds(p.pid) for p in procs) - before
    report = json.loads(out)
    requests = report["requests"]
    return {
        "requests_per_second": report["requests_per_second"],
        "server_cpu_seconds": round(used, 3),
        "cpu_us_per_request": round(used / requests * 1e6, 2) if requests else None,
        "errors": report["errors"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--protocols", nargs="*", default=["echo", "lookup", "memcached"])
    parser.add_argument("--shardloop-python", default=sys.executable)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="measure only the servers of these names")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    binary()
    results: dict[str, dict[str, dict]] = {}
    for protocol in args.protocols:
        port = free_port()
        for name, (commands, core) in servers(protocol, port, args.shardloop_python).items():
            if args.only and name not in args.only:
                continue
            result = measure(commands, core, protocol, port, args.seconds, args.pipeline)
            results.setdefault(protocol, {})[name] = result
            if not args.json:
                print(
                    f"{protocol:9} {name:26} {result['requests_per_second']:>9,} req/s  "
                    f"{result['cpu_us_per_request']:>7} us CPU per request  "
                    f"errors {result['errors']}",
                    flush=True,
                )
        mine = results.get(protocol, {})
        for over, under in [
            ("shardloop, 2 shards", "shardloop, 1 shard"),
            ("shardloop, 1 shard", "Rust core, 1 shard"),
            ("shardloop, 1 shard", "uvloop, 1 process"),
            ("shardloop loop, protocol", "uvloop loop, protocol"),
            ("shardloop loop, protocol", "asyncio loop, protocol"),
            ("shardloop loop, streams", "uvloop, 1 process"),
            ("shardloop loop, streams", "asyncio loop, streams"),
        ]:
            if over in mine and under in mine and not args.json:
                ratio = mine[over]["cpu_us_per_request"] / mine[under]["cpu_us_per_request"]
                print(f"{protocol:9} CPU per request, {over} / {under}: {ratio:.2f}x")
    if args.json:
        print(json.dumps({"python": args.shardloop_python, "results": results}, indent=2))


if __name__ == "__main__":
    main()
