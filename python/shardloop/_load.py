"""``python -m shardloop load``: drives an echo, lookup or memcached server
with many connections for a fixed time and reports requests/s and latency.

Each connection sends a request (or ``--pipeline N`` of them), waits for the
whole answer, and sends the next (a closed loop). The connections run on one
native thread with epoll (the ``shardloop-load`` crate), so the generator
takes as little as it can from the server it measures, and it prints a
progress line every second.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ._shardloop import load

PROTOCOLS = ("echo", "lookup", "memcached")


def drive(
    host: str,
    port: int,
    protocol: str = "lookup",
    connections: int = 64,
    seconds: float = 5.0,
    size: int = 64,
    keys: int = 100_000,
    progress: bool = True,
    pipeline: int = 1,
) -> dict[str, Any]:
    """Runs the load and returns its summary: requests, errors, seconds,
    requests_per_second, and p50_us/p99_us/p999_us latencies. Each
    connection sends `pipeline` requests at once, then waits for them all."""
    summary = load(host, port, protocol, connections, seconds, size, keys, progress, pipeline)
    summary["requests_per_second"] = round(summary["requests_per_second"])
    for key in ("seconds", "p50_us", "p99_us", "p999_us"):
        summary[key] = round(summary[key], 3 if key == "seconds" else 1)
    return {"protocol": protocol, "connections": connections, "pipeline": pipeline, **summary}


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 30) -> None:
    """Waits until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@contextlib.contextmanager
def serving(
    commands: Sequence[Sequence[str]],
    port: int,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[None]:
    """Runs the server processes of `commands` (listening on `port`) for the
    body of the `with`, then stops them: SIGINT, and SIGKILL after 20 s."""
    procs = [
        subprocess.Popen(
            list(cmd),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
        )
        for cmd in commands
    ]
    try:
        wait_for_port(port)
        time.sleep(0.3)
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shardloop load", description=__doc__)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="lookup")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--size", type=int, default=64, help="echo payload bytes; memcached value bytes"
    )
    parser.add_argument(
        "--keys", type=int, default=100_000, help="lookup ids and memcached keys drawn from 0..keys"
    )
    parser.add_argument(
        "--pipeline", type=int, default=1, help="requests each connection sends at once"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    summary = drive(
        args.host,
        args.port,
        args.protocol,
        args.connections,
        args.seconds,
        args.size,
        args.keys,
        progress=not args.json,
        pipeline=args.pipeline,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{args.protocol}: {summary['requests_per_second']:,} requests/s over "
            f"{args.connections} connections (pipeline {args.pipeline}), "
            f"{summary['seconds']}s; latency p50 "
            f"{summary['p50_us']} us, p99 {summary['p99_us']} us, p999 "
            f"{summary['p999_us']} us; errors {summary['errors']}"
        )
