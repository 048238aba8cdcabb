"""shardloop's memcached-protocol example against the real memcached, both
driven by the same client with the same settings, in one run, on loopback:
memcaslap (libmemcached-tools), or shardloop's own load generator
(``python tools/loadgen.py --protocol memcached``: 9 gets to 1 set).

    python benches/net/memcached.py [--seconds 5] [--concurrency 64]
                                    [--client memcaslap|shardloop] [--client-cpu N]
                                    [--one-core]

``--one-core`` puts each server alone on core 0 (``taskset``) and the client
alone on core 1: ``memcached -t 1`` against the example on one shard that
sleeps as soon as it is idle (``--idle-poll 0``), as a server is placed in
production.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from loadgen import binary, free_port, serving  # noqa: E402  (tools/, put on the path above)
from run import run_client, shardloop_load  # noqa: E402  (this folder's runner)


def memcaslap(port: int, args: argparse.Namespace) -> dict[str, float]:
    tool = shutil.which("memcaslap")
    if tool is None:
        raise SystemExit("memcaslap is missing: make tools (libmemcached-tools)")
    command = [tool, "-s", f"127.0.0.1:{port}", "-t", f"{args.seconds}s"]
    command += ["-c", str(args.concurrency), "-T", "1"]
    tps = re.findall(r"TPS: (\d+)", run_client(command, args.seconds, args.client_cpu))
    return {"ops_per_second": float(tps[-1])}


def memcached_load(port: int, args: argparse.Namespace) -> dict[str, float]:
    """The same load from shardloop's load generator (1,024-byte values,
    10,000 keys, as memcaslap's defaults)."""
    summary = shardloop_load(
        "memcached",
        port,
        args.concurrency,
        args.seconds,
        args.client_cpu,
        *["--size", "1024", "--keys", "10000"],
    )
    return {"ops_per_second": float(summary["requests_per_second"]), "p99_us": summary["p99_us"]}


def example(port: int) -> list[str]:
    return [sys.executable, str(ROOT / "examples" / "memcached_server.py"), "--port", str(port)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--client-cpu",
        type=int,
        default=None,
        help="pin the client to this core (default: the scheduler places it)",
    )
    parser.add_argument("--client", choices=("memcaslap", "shardloop"), default="memcaslap")
    parser.add_argument(
        "--one-core",
        action="store_true",
        help="each server alone on core 0, the client alone on core 1",
    )
    args = parser.parse_args()
    if args.client == "shardloop":
        binary()  # the load generator, built before any server starts
    memcached = shutil.which("memcached") or "memcached"
    if args.one_core:
        args.client_cpu = 1
        pin = ["taskset", "-c", "0"]
        servers = {
            "memcached -t 1, core 0": lambda port: [
                *pin,
                *[memcached, "-t", "1", "-p", str(port), "-l", "127.0.0.1", "-U", "0"],
                *["-u", "nobody"],
            ],
            "shardloop example, 1 shard, core 0": lambda port: [
                *pin,
                *example(port),
                *["--shards", "1", "--idle-poll", "0"],
            ],
        }
        run_servers(servers, args, "memcached -t 1, core 0")
        return
    servers = {
        "memcached -t 2": lambda port: [
            memcached,
            "-t",
            "2",
            "-p",
            str(port),
            "-l",
            "127.0.0.1",
            "-U",
            "0",
            "-u",
            "nobody",
        ],
        "shardloop example, 1 shard": lambda port: [*example(port), "--shards", "1"],
        "shardloop example, 2 shards": lambda port: [*example(port), "--shards", "2"],
        "shardloop example, 2 shards, overprovisioned": lambda port: [
            *["env", "SHARDLOOP_OVERPROVISIONED=1"],  # memcaslap shares the cores
            *example(port),
            "--shards",
            "2",
        ],
    }
    run_servers(servers, args, "memcached -t 2")


def run_servers(
    servers: dict[str, Callable[[int], list[str]]], args: argparse.Namespace, base_name: str
) -> None:
    """Drives each server in turn with the same client; prints ops/s and
    the ratio of each shardloop server to `base_name`."""
    results = {}
    for name, command in servers.items():
        port = free_port()
        with serving([command(port)], port):
            client = memcaslap if args.client == "memcaslap" else memcached_load
            results[name] = client(port, args)
        print(f"{name:36} {results[name]['ops_per_second']:>12,.0f} ops/s", flush=True)
    base = results[base_name]["ops_per_second"]
    for name, result in results.items():
        if name.startswith("shardloop"):
            print(f"{name} / {base_name} = {result['ops_per_second'] / base:.2f}x")


if __name__ == "__main__":
    main()
