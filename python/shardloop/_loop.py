"""Shard loops: asyncio event loops whose waiting happens in the shard's Rust
reactor, with the GIL released.

A :class:`ShardLoop` is a standard selector event loop with one difference:
its selector, instead of blocking in ``epoll_wait``, asks the shard's driver
to wait. The driver polls the shard's rings (cross-shard calls and their
answers), its timers and, through one watched descriptor, the loop's own
epoll set; it returns as soon as any of them has something for Python. The
loop then runs the calls that arrived and resolves the futures of calls that
came back, on this thread, before running its ready callbacks.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import selectors
import signal
import threading
import weakref
from typing import Any

from . import _shardloop

_running_loop = asyncio.events._get_running_loop


class _ShardSelector(selectors.EpollSelector):
    """An epoll selector whose blocking wait happens in the shard's driver.

    The driver watches this selector's epoll descriptor (edge-triggered), so
    the selector only asks its own epoll set for events when that descriptor
    signalled, or when the previous look found events (some may remain: the
    set is level-triggered). That saves a syscall on most turns.
    """

    def __init__(self, driver: _shardloop.Driver, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._driver = driver
        self._loop = loop
        self._look = True
        driver.watch_fd(self.fileno())

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0) if self._look else []
        if ready or (timeout is not None and timeout <= 0):
            signalled = self._driver.poll(self._loop)
        else:
            signalled = self._driver.wait(self._loop, timeout)
            if signalled:
                ready = super().select(0)
                signalled = False
        self._look = bool(ready) or signalled
        return ready

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self._look = True
        return super().register(fileobj, events, data)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self._look = True
        return super().modify(fileobj, events, data)


class ShardLoop(asyncio.SelectorEventLoop):
    """The asyncio event loop of one shard.

    On every shard ``asyncio.get_running_loop()`` returns its ShardLoop; the
    standard library (tasks, timers, streams, executors, thread-safe
    callbacks) works on it as on the default loop.
    """

    def __init__(
        self, driver: _shardloop.Driver, runtime: _shardloop.Runtime | None = None
    ) -> None:
        self._driver = driver
        self._runtime = runtime
        self._stopped: asyncio.Future[None] | None = None
        self._old_wakeup_fd: int | None = None
        self._cancel_on_close = False
        super().__init__(selector=_ShardSelector(driver, self))
        if runtime is not None and threading.current_thread() is threading.main_thread():
            # The shard waits in Rust, where Python cannot see a signal; the
            # C-level handler's write to this loop's self-pipe wakes the
            # shard so that Python runs the handler (Ctrl-C included).
            # (_csock is the write end of the self-pipe of every selector loop.)
            self_pipe = self._csock  # type: ignore[attr-defined]
            self._old_wakeup_fd = signal.set_wakeup_fd(self_pipe.fileno())
        if runtime is not None:
            _open_runtimes.add(self)

    @property
    def shard_id(self) -> int:
        """The index of this loop's shard."""
        return self._driver.shard_id

    @property
    def shard_count(self) -> int:
        """The number of shards of this loop's runtime."""
        return self._driver.shard_count

    def _process_events(self, event_list: list[Any]) -> None:
        # (_process_events is the selector loop's hook for the events of one
        # select(); typeshed does not list it.) Most turns have no I/O event.
        if event_list:
            super()._process_events(event_list)  # type: ignore[misc]
        # Cross-shard calls were run, and returned calls resolved, by the
        # driver inside select(); what is left is to notice the end.
        stopped = self._stopped
        if stopped is not None and not stopped.done() and self._driver.may_stop():
            stopped.set_result(None)

    def run_forever(self) -> None:
        # While this loop runs, its shard is the thread's current one.
        self._driver.activate(self)
        try:
            super().run_forever()
        finally:
            self._driver.deactivate()

    def _until_stopped(self) -> asyncio.Future[None]:
        """A future that completes once shutdown lets this shard stop."""
        if self._stopped is None:
            self._stopped = self.create_future()
        return self._stopped

    def close(self) -> None:
        """Closes the loop; on shard 0 this shuts the whole runtime down,
        finishing every call already submitted."""
        if self.is_closed():
            return
        runtime = self._runtime
        if self._old_wakeup_fd is not None:
            try:
                signal.set_wakeup_fd(self._old_wakeup_fd)
            except (OSError, ValueError):  # that descriptor was closed since
                signal.set_wakeup_fd(-1)
            self._old_wakeup_fd = None
        if runtime is not None:
            # Another loop may be running on this thread (this one was made
            # and closed inside it): then shard 0 is drained in Rust alone.
            can_run = asyncio.events._get_running_loop() is None
            if self._cancel_on_close and can_run:
                # Interrupted: stop the work running for us elsewhere too.
                from .shard import invoke_on_others

                self.run_until_complete(invoke_on_others(_cancel_tasks))
            runtime.begin_shutdown()
            if can_run:
                # Keep serving this shard's queues until every shard is done.
                self.run_until_complete(self._until_stopped())
            super().close()
            self._driver.close()
            runtime.shutdown()
        else:
            super().close()


_open_runtimes: weakref.WeakSet[ShardLoop] = weakref.WeakSet()


@atexit.register
def _close_open_runtimes() -> None:
    """Shuts down runtimes whose loops were never closed, before the
    interpreter goes away under their shards."""
    for loop in list(_open_runtimes):
        if not loop.is_closed() and not loop.is_running():
            loop.close()


def _serve_shard(driver: _shardloop.Driver) -> None:
    """The main function of shards 1..N: run a ShardLoop until shutdown."""
    threading.current_thread().name = f"shard-{driver.shard_id}"
    loop = ShardLoop(driver)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(loop._until_stopped())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        _cancel_remaining(loop)
        loop.close()
        asyncio.set_event_loop(None)


def _cancel_tasks() -> int:
    """Cancels every task of the current shard's loop; returns how many."""
    tasks = [t for t in asyncio.all_tasks() if not t.done()]
    for task in tasks:
        task.cancel()
    return len(tasks)


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def _shard_count(shards: int | None) -> int | None:
    if shards is not None:
        return shards
    env = os.environ.get("SHARDLOOP_SHARDS")
    if env:
        try:
            return int(env)
        except ValueError:
            raise ValueError(f"SHARDLOOP_SHARDS must be an integer, not {env!r}") from None
    return None


def new_event_loop(
    shards: int | None = None,
    *,
    pin: bool = True,
    idle_poll: float = 200e-6,
    overprovisioned: bool | None = None,
) -> ShardLoop:
    """Starts a runtime and returns shard 0's loop, for the calling thread.

    ``shards`` defaults to ``SHARDLOOP_SHARDS`` or one per available core;
    ``idle_poll`` is how long (seconds) an idle shard keeps polling before it
    sleeps. ``overprovisioned`` (default: ``SHARDLOOP_OVERPROVISIONED=1``)
    says the shards share their cores with other busy threads, such as a
    load generator on the same machine: shards are then not pinned, and
    they yield their core while they poll or wait for the GIL instead of
    spinning. Closing the loop shuts the runtime down. Use it with
    ``asyncio.run(main(), loop_factory=shardloop.new_event_loop)``.
    """
    if overprovisioned is None:
        overprovisioned = os.environ.get("SHARDLOOP_OVERPROVISIONED", "") not in ("", "0")
    if threading.current_thread() is not threading.main_thread() and pin:
        # Pinning shard 0 pins the calling thread; that is only expected of
        # the main thread.
        pin = False
    runtime = _shardloop.Runtime(
        _serve_shard,
        shards=_shard_count(shards),
        pin=pin,
        idle_poll=idle_poll,
        overprovisioned=overprovisioned,
    )
    try:
        driver = runtime.enter()
    except BaseException:
        runtime.begin_shutdown()
        runtime.shutdown()
        raise
    return ShardLoop(driver, runtime)


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """An event loop policy whose loops are shardloop runtimes (like uvloop's)."""

    def new_event_loop(self) -> ShardLoop:
        return new_event_loop()


def current_loop() -> ShardLoop:
    """The running shard loop of this thread, or RuntimeError saying how to
    get one."""
    loop = _running_loop()
    if isinstance(loop, ShardLoop):
        return loop
    raise RuntimeError(
        "not running on a shard: start a runtime with shardloop.run(main()) "
        "(or asyncio.run(main(), loop_factory=shardloop.new_event_loop)) and call "
        "this from code running on it"
    )
