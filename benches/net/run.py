"""Echo and lookup servers under the same load, in one run, on loopback:
shardloop on 1 and 2 shards, the same server on stock asyncio and on uvloop
(one process), and uvloop in 2 processes sharing the port (SO_REUSEPORT).

    python benches/net/run.py [--seconds 5] [--connections 64] [--json]

Every server is started, given the same load by the ``shardloop-load``
binary (``tools/loadgen.py`` builds and runs it; its own process) for a fixed
time, and stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
from loadgen import binary, command, free_port, serving  # noqa: E402  (tools/, put on the path above)


def run_client(command: list[str], seconds: float, cpu: int | None) -> str:
    """Runs a load client for about `seconds`, pinned to core `cpu`
    (``taskset``) or where the scheduler puts it (None); returns its output."""
    pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
    return subprocess.run(
        [*pin, *command],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
        cwd=ROOT,
    ).stdout


def shardloop_load(
    protocol: str, port: int, connections: int, seconds: float, cpu: int | None, *extra: str
) -> dict:
    """The summary of the load generator (``shardloop-load --json``) against
    127.0.0.1:`port`."""
    cmd = [*command("127.0.0.1", port, protocol, connections, seconds), *extra, "--json"]
    result: dict = json.loads(run_client(cmd, seconds, cpu).strip().splitlines()[-1])
    return result


def servers(protocol: str, port: int, shardloop_python: str) -> dict[str, list[list[str]]]:
    py = sys.executable
    example = str(ROOT / "examples" / f"{protocol}_server.py")
    baseline = str(HERE / "baseline_server.py")
    common = ["--protocol", protocol, "--port", str(port)]
    rust_echo = str(ROOT / "target" / "release" / "examples" / "echo")
    shared = ["env", "SHARDLOOP_OVERPROVISIONED=1"]  # the client shares the cores
    rust = (
        {
            "rust core echo, 1 shard": [[rust_echo, "--port", str(port), "--shards", "1"]],
            "rust core echo, 2 shards": [[rust_echo, "--port", str(port), "--shards", "2"]],
            "rust core echo, 2 shards, overprovisioned": [
                [*shared, rust_echo, "--port", str(port), "--shards", "2"]
            ],
        }
        if protocol == "echo"
        else {}
    )
    ours = [shardloop_python, example, "--port", str(port)]
    return {
        **rust,
        "shardloop, 1 shard": [[*ours, "--shards", "1"]],
        "shardloop, 2 shards": [[*ours, "--shards", "2"]],
        "shardloop, 2 shards, overprovisioned": [[*shared, *ours, "--shards", "2"]],
        "shardloop, 2 shards, overprovisioned, round_robin": [
            [*shared, *ours, "--shards", "2", "--balance", "round_robin"]
        ],
        "shardloop streams, 1 shard": [[*ours, "--shards", "1", "--api", "streams"]],
        "shardloop streams, 2 shards, overprovisioned": [
            [*shared, *ours, "--shards", "2", "--api", "streams"]
        ],
        "asyncio, 1 process": [[py, baseline, "--loop", "asyncio", *common]],
        "uvloop, 1 process": [[py, baseline, "--loop", "uvloop", *common]],
        "uvloop, 2 processes (SO_REUSEPORT)": [[py, baseline, "--loop", "uvloop", *common]] * 2,
    }


def measure(commands: list[list[str]], protocol: str, port: int, args: argparse.Namespace) -> dict:
    with serving(commands, port, cwd=ROOT):
        return shardloop_load(
            protocol,
            port,
            args.connections,
            args.seconds,
            args.client_cpu,
            "--pipeline",
            str(args.pipeline),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--protocols", nargs="*", default=["echo", "lookup"])
    parser.add_argument("--only", default="", help="run only servers whose name contains this")
    parser.add_argument(
        "--pipeline", type=int, default=1, help="requests each client connection sends at once"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--client-cpu",
        type=int,
        default=None,
        help="pin the load generator to this core (default: the scheduler places it)",
    )
    parser.add_argument(
        "--shardloop-python",
        default=sys.executable,
        help="interpreter of the shardloop servers (for example a free-threaded one)",
    )
    args = parser.parse_args()
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "shardloop-core", "--example", "echo"],
        cwd=ROOT,
        check=True,
    )
    binary()  # the load generator, built before any server starts
    results: dict[str, dict[str, dict]] = {}
    for protocol in args.protocols:
        results[protocol] = {}
        for name, commands in servers(protocol, port := free_port(), args.shardloop_python).items():
            if args.only not in name:
                continue
            results[protocol][name] = measure(commands, protocol, port, args)
            r = results[protocol][name]
            rate = r["requests_per_second"]
            print(
                f"{protocol:7} {name:36} {rate:>9,} req/s  p50 {r['p50_us']:>8} us"
                f"  p99 {r['p99_us']:>8} us  p999 {r['p999_us']:>8} us  errors {r['errors']}",
                flush=True,
            )
    for protocol, rows in results.items():
        if "uvloop, 1 process" not in rows:
            continue
        base = rows["uvloop, 1 process"]["requests_per_second"]
        for name, row in rows.items():
            if name.startswith("shardloop"):
                ratio = row["requests_per_second"] / base
                print(f"{protocol}: {name} / uvloop, 1 process = {ratio:.2f}x")
    if args.json:
        print(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
