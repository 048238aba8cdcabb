"""Bounded fault scenarios: each runs as a child Python process that cannot
outlive its timeout.

The child arms ``faulthandler`` at start-up: ``dump_traceback_later`` makes a
hung child print every thread's stack and exit, and SIGABRT (sent by the
parent when the child outlives its timeout anyway, e.g. stuck in native code
that holds the GIL) dumps the stacks too. Only then is the child killed, so a
hang fails with the stacks that explain it rather than with silence.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path

_PRELUDE = """\
import faulthandler as _fh, os as _os, sys as _sys
_fh.enable(all_threads=True)
_fh.dump_traceback_later({watchdog!r}, exit=True)
"""

# A scale factor for the heavy scenarios: SHARDLOOP_FAULT_SCALE=10 runs ten
# times as many calls.
SCALE = max(1, int(os.environ.get("SHARDLOOP_FAULT_SCALE", "1") or "1"))


class ScenarioTimeout(AssertionError):
    """The child did not finish in time; the message holds its stacks."""


class Child:
    """A running scenario: a child Python process with faulthandler armed.

    Use as a context manager so that the child never outlives the test.
    """

    def __init__(
        self,
        code: str,
        *,
        timeout: float = 20,
        env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.timeout = timeout
        self.code = textwrap.dedent(code)
        # The child's own watchdog fires a little after the parent's deadline
        # would: the parent sends SIGABRT first (stacks of every thread), the
        # watchdog is the backstop should the parent itself be stuck.
        prelude = _PRELUDE.format(watchdog=timeout + 5)
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.pop("PYTHONFAULTHANDLER", None)
        if env:
            full_env.update(env)
        # stderr goes to a file: a child that writes much there (panics,
        # warnings) must not block on a full pipe while stdout is read.
        self._err = tempfile.TemporaryFile()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", prelude + self.code, *args],
            stdout=subprocess.PIPE,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
        )
        self.pid = self.proc.pid
        self._out = bytearray()
        self._lines_read = 0
        self.stdout = ""
        self.stderr = ""

    @property
    def deadline(self) -> float:
        return self.started + self.timeout

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self._abort()

    def wait_for_line(self, expected: str, timeout: float | None = None) -> float:
        """Waits until the child prints a line equal to ``expected`` on
        stdout; returns the time it was seen. Fails with the child's stacks
        if it does not come in time."""
        self.read_line(expected, exact=True, timeout=timeout)
        return time.monotonic()

    def read_line(self, prefix: str, *, exact: bool = False, timeout: float | None = None) -> str:
        """The next line the child prints on stdout that starts with
        ``prefix`` (or equals it, with ``exact``); lines before it are
        skipped. Fails with the child's stacks if none comes in time."""
        assert self.proc.stdout is not None
        limit = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        fd = self.proc.stdout.fileno()
        while True:
            lines = self._out.decode(errors="replace").split("\n")
            for line in lines[self._lines_read : -1]:
                self._lines_read += 1
                text = line.strip()
                if text == prefix or (not exact and text.startswith(prefix)):
                    return text
            left = limit - time.monotonic()
            if left <= 0:
                self._abort()
                raise ScenarioTimeout(
                    f"the child did not print {prefix!r} in time\n{self.report()}"
                )
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.finish(timeout=5)
                    raise AssertionError(
                        f"the child exited before printing {prefix!r}\n{self.report()}"
                    )
                self._out += chunk

    def signal(self, signum: int) -> float:
        """Sends ``signum`` to the child; returns when it was sent."""
        self.proc.send_signal(signum)
        return time.monotonic()

    def finish(self, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Waits for the child to exit; on timeout dumps its stacks (SIGABRT),
        kills it and raises ScenarioTimeout with everything it printed."""
        left = self.deadline - time.monotonic() if timeout is None else timeout
        try:
            out, err = self.proc.communicate(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            self._abort()
            raise ScenarioTimeout(
                f"the child did not exit within its time limit\n{self.report()}"
            ) from None
        self._collect(out, err)
        return self.result()

    def result(self) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(
            self.proc.args, self.proc.returncode, self.stdout, self.stderr
        )

    def _collect(self, out: bytes | None, err: bytes | None) -> None:
        self._out += out or b""
        self.stdout = self._out.decode(errors="replace")
        if not self._err.closed:
            self._err.seek(0)
            self.stderr = self._err.read().decode(errors="replace")
            self._err.close()

    def _abort(self) -> None:
        """SIGABRT (faulthandler prints every thread's stack), then SIGKILL."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGABRT)
        try:
            out, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        self._collect(out, err)

    def report(self) -> str:
        return (
            f"returncode: {self.proc.returncode}\n"
            f"--- stdout ---\n{self.stdout[-4000:]}\n"
            f"--- stderr ---\n{self.stderr[-12000:]}"
        )


def run_script(
    code: str,
    timeout: float = 20,
    signal_after: str | None = None,
    signum: int = signal.SIGINT,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a child Python with faulthandler armed and returns
    how it ended. A child that outlives ``timeout`` seconds is made to dump
    every thread's stack (SIGABRT), killed, and the test fails with the
    stacks (ScenarioTimeout).

    ``signal_after``: a line the child prints on stdout when it is ready for
    ``signum`` (SIGINT by default); the signal is sent once it appears.
    """
    with Child(code, timeout=timeout, env=env, args=args) as child:
        if signal_after is not None:
            child.wait_for_line(signal_after)
            child.signal(signum)
        return child.finish()


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    """What a finished child printed, for assertion messages."""
    return (
        f"returncode: {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n"
        f"--- stderr ---\n{proc.stderr[-12000:]}"
    )


def assert_clean_exit(proc: subprocess.CompletedProcess[str], code: int = 0) -> None:
    """The child exited with ``code`` and no panic or fatal error."""
    assert proc.returncode == code, describe(proc)
    for bad in ("panicked", "FATAL", "Fatal Python error", "RefCell"):
        assert bad not in proc.stderr, describe(proc)


def open_fds(pid: int) -> int:
    """How many descriptors process ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# Common code for the children: a bounded run of main() on two unpinned shards.
PREAMBLE = """\
import asyncio, gc, os, signal, sys, threading, time, weakref
import shardloop
from shardloop import shard

def run2(coro, **kwargs):
    kwargs.setdefault("shards", 2)
    kwargs.setdefault("pin", False)
    return shardloop.run(coro, **kwargs)

def os_threads():
    return len(os.listdir("/proc/self/task"))

def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True

BASE_THREADS = os_threads()
"""


# From another shard: returns once shard 0's main() has returned and the
# runtime is shutting down (a scenario appends main()'s task to MAIN).
SHUTDOWN_PROBE = """
MAIN = []

def main_finished():
    return bool(MAIN) and MAIN[0].done()

async def wait_for_shutdown():
    while True:
        try:
            if await shard.submit_to(0, main_finished):
                return
        except shardloop.ShutdownError:
            return
        await asyncio.sleep(0.001)
"""


def scenario(*parts: str) -> str:
    """PREAMBLE followed by ``parts``, each dedented on its own."""
    return PREAMBLE + "\n".join(textwrap.dedent(part) for part in parts)
