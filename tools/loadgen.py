"""The load generator from Python: drives an echo, lookup or memcached server
with many connections for a fixed time and reports requests/s and latency.

Each connection sends a request (or ``--pipeline N`` of them), waits for the
whole answer, and sends the next (a closed loop). The connections run on one
native thread with epoll in a process of their own: the ``shardloop-load``
binary (``rust/load``), built on first use, so the generator takes as little
as it can from the server it measures.

    python tools/loadgen.py --port P [--protocol echo|lookup|memcached] [--json] ...

takes the binary's options (``--help`` lists them). The benchmarks, scripts,
examples and tests import this module (``import loadgen``, with this folder
on ``sys.path``) for ``drive`` and the helpers that start and stop servers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ("echo", "lookup", "memcached")
BUILD = ["cargo", "build", "--release", "-q", "-p", "shardloop-load"]

_built: str | None = None
_build_lock = threading.Lock()


def _target_dir() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR") or "target")
    return target if target.is_absolute() else ROOT / target


def binary() -> str:
    """The path of the ``shardloop-load`` binary: ``$SHARDLOOP_LOAD`` if set;
    otherwise ``cargo build --release -p shardloop-load`` is run in the
    repository once per process (it returns at once when the binary is up to
    date) and the binary of the target folder (``$CARGO_TARGET_DIR`` or
    ``target``) is used."""
    global _built
    explicit = os.environ.get("SHARDLOOP_LOAD")
    if explicit:
        return explicit
    with _build_lock:
        if _built is None:
            path = _target_dir() / "release" / "shardloop-load"
            try:
                subprocess.run(BUILD, cwd=ROOT, check=True, capture_output=True, text=True)
            except FileNotFoundError:
                if not path.exists():  # no cargo, and nothing built before
                    raise RuntimeError(
                        "cargo is not installed and the load generator is not built: "
                        f"run `{' '.join(BUILD)}` or set SHARDLOOP_LOAD"
                    ) from None
            except subprocess.CalledProcessError as err:
                raise RuntimeError(
                    f"building the load generator failed:\n{err.stderr.strip()}"
                ) from None
            _built = str(path)
        return _built


def command(
    host: str,
    port: int,
    protocol: str = "lookup",
    connections: int = 64,
    seconds: float = 5.0,
    size: int = 64,
    keys: int = 100_000,
    pipeline: int = 1,
) -> list[str]:
    """The command line that runs the load generator with these settings
    (add ``--json`` for a machine-readable summary)."""
    return [
        binary(),
        f"--host={host}",
        f"--port={port}",
        f"--protocol={protocol}",
        f"--connections={connections}",
        f"--seconds={seconds}",
        f"--size={size}",
        f"--keys={keys}",
        f"--pipeline={pipeline}",
    ]


def _failure(returncode: int, stderr: str) -> Exception:
    """The exception for a run that ended with `returncode`: ValueError for
    bad arguments (status 2), OSError (with its errno when the binary names
    one, e.g. ConnectionRefusedError) when the run failed."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines()]
    messages = [line.removeprefix("shardloop-load: ") for line in lines if line]
    message = next((m for m in messages if not m.startswith("Try ")), f"exit status {returncode}")
    if returncode == 2:
        return ValueError(message)
    errno = re.search(r"\(os error (\d+)\)", message)
    if errno:
        return OSError(int(errno.group(1)), message)
    return OSError(f"the load generator failed ({returncode}): {message}")


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
    """Runs the load and returns its summary: protocol, connections,
    pipeline, requests, errors, seconds (to the millisecond),
    requests_per_second (a whole number), and p50_us/p99_us/p999_us
    latencies (to a tenth of a microsecond; None when no request finished).
    Each connection sends `pipeline` requests at once, then waits for them
    all. With `progress`, the generator's progress line goes to stderr.

    Bad settings raise ValueError; a server that cannot be reached at all,
    OSError (ConnectionRefusedError when nothing listens)."""
    cmd = command(host, port, protocol, connections, seconds, size, keys, pipeline)
    cmd.append("--json")
    if progress:
        cmd.append("--progress")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            errors: list[bytes] = []
            # stdout holds one short line at the end: reading stderr first
            # cannot block the generator on a full stdout pipe.
            while chunk := os.read(proc.stderr.fileno(), 4096):
                errors.append(chunk)
                if progress:
                    sys.stderr.write(chunk.decode(errors="replace"))
                    sys.stderr.flush()
            out = proc.stdout.read().decode()
            returncode = proc.wait()
        except BaseException:
            proc.kill()
            raise
    if returncode:
        raise _failure(returncode, b"".join(errors).decode(errors="replace"))
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return summary


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
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Runs the server processes of `commands` (listening on `port`) for the
    body of the `with`, which gets them, then stops them: SIGINT, and
    SIGKILL after 20 s."""
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
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: Sequence[str]) -> int:
    """Runs the binary with `argv` (its options) and returns its exit status."""
    try:
        path = binary()
    except RuntimeError as err:
        print(f"loadgen: {err}", file=sys.stderr)
        return 1
    try:
        return subprocess.run([path, *argv], check=False).returncode
    except KeyboardInterrupt:  # the generator got the same Ctrl-C
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
