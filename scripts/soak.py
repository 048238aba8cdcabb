"""A bounded soak of the example servers (``make soak``; not part of ``make test``).

For ``--minutes`` (default 10) it starts the lookup and the memcached
examples in turn, each on 2 shards, and over each server's life repeats:
load from the native load generator for a few seconds, connections reset in
the middle of a request (``SO_LINGER`` 0), and connections that send half a
request and go. After each round it reads the server's resident memory and
open descriptors. At a random round the server is stopped with SIGINT, which
must end it within two seconds and without a crash; then the next one
starts.

It fails (exit 1, with the figures) if a server crashes or does not stop, if
its descriptors do not come back to where they were after the first round,
or if its memory keeps growing: the last rounds' RSS may not exceed the first
measured round's by more than ``--rss-slack`` MiB.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from loadgen import drive, free_port, wait_for_port  # noqa: E402  (tools/, put on the path above)

SERVERS = {
    "lookup": ROOT / "examples" / "lookup_server.py",
    "memcached": ROOT / "examples" / "memcached_server.py",
}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def half_request(protocol: str, rng: random.Random) -> bytes:
    if protocol == "lookup":
        return struct.pack(">I", rng.randrange(1 << 20))[: rng.randrange(1, 4)]
    value = b"v" * rng.randrange(1, 4096)
    whole = b"set k%d 0 0 %d\r\n" % (rng.randrange(1000), len(value)) + value + b"\r\n"
    return whole[: rng.randrange(1, len(whole))]


def abuse(port: int, protocol: str, rng: random.Random, count: int) -> None:
    """Connections that reset mid-request, and ones that leave half a request."""
    for i in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(half_request(protocol, rng))
            if i % 2 == 0:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def soak_server(protocol: str, deadline: float, rng: random.Random, slack: float) -> list[str]:
    """Runs one server until a random round (or the deadline); returns the
    problems seen."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(SERVERS[protocol]), "--port", str(port), "--shards", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "SHARDLOOP_OVERPROVISIONED": "1"},
    )
    problems: list[str] = []
    try:
        wait_for_port(port)
        rounds = rng.randrange(4, 12)
        fds: list[int] = []
        rss: list[float] = []
        for _ in range(rounds):
            if time.monotonic() > deadline:
                break
            summary = drive(
                "127.0.0.1", port, protocol, connections=32, seconds=2.0, progress=False
            )
            abuse(port, protocol, rng, 50)
            time.sleep(0.3)  # the server closes what the clients left
            fds.append(descriptors(proc.pid))
            rss.append(rss_mib(proc.pid))
            print(
                f"  {protocol}: {summary['requests_per_second']:,} req/s, "
                f"errors {summary['errors']}, fds {fds[-1]}, rss {rss[-1]:.1f} MiB",
                flush=True,
            )
        if len(fds) >= 2 and fds[-1] > fds[0]:
            problems.append(f"{protocol}: descriptors grew from {fds[0]} to {fds[-1]}")
        if len(rss) >= 3 and min(rss[-2:]) > rss[0] + slack:
            problems.append(f"{protocol}: RSS grew from {rss[0]:.1f} to {rss[-1]:.1f} MiB")
        # Ctrl-C at a random moment, here while connections are busy.
        busy = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        for s in busy:
            s.sendall(half_request(protocol, rng))
        time.sleep(rng.random() * 0.2)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            problems.append(f"{protocol}: still running 2 s after SIGINT")
        else:
            if proc.returncode < 0 and proc.returncode != -signal.SIGINT:
                problems.append(f"{protocol}: died of signal {-proc.returncode}")
            print(f"  {protocol}: stopped {time.monotonic() - started:.2f} s after SIGINT")
        for s in busy:
            s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace")
        if "panicked" in err or "Fatal Python error" in err:
            problems.append(f"{protocol}: {err.strip().splitlines()[-1]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rss-slack", type=float, default=32.0, help="MiB")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    problems: list[str] = []
    servers = 0
    while time.monotonic() < deadline:
        protocol = ("lookup", "memcached")[servers % 2]
        print(f"server {servers + 1}: {protocol}", flush=True)
        problems += soak_server(protocol, deadline, rng, args.rss_slack)
        servers += 1
    print(f"{servers} servers soaked; {len(problems)} problems")
    for problem in problems:
        print("  " + problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
