"""shardloop: Seastar's shard-per-core model for Python.

One pinned event loop per core ("shard"), each an asyncio loop; no locks
between shards; shards talk only through single-producer/single-consumer
queues. Send plain functions or coroutine functions to a chosen shard::

    import shardloop
    from shardloop import shard

    async def main():
        return await shard.submit_to(1, sum, [1, 2, 3])

    print(shardloop.run(main()))
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from . import shard
from ._loop import EventLoopPolicy, ShardLoop, _CtrlCStops, current_loop, new_event_loop
from ._shardloop import Connection, ShutdownError
from .alien import Runtime, start
from .connection import connect
from .gate import Gate, GateClosedError
from .groups import DEFAULT_MAX_INFLIGHT, ServiceGroup
from .server import ShardedServer, serve, serve_connections
from .sharded import ForeignRef, Sharded

T = TypeVar("T")

__all__ = [
    "DEFAULT_MAX_INFLIGHT",
    "Connection",
    "EventLoopPolicy",
    "ForeignRef",
    "Gate",
    "GateClosedError",
    "Runtime",
    "ServiceGroup",
    "ShardLoop",
    "Sharded",
    "ShardedServer",
    "ShutdownError",
    "connect",
    "new_event_loop",
    "run",
    "serve",
    "serve_connections",
    "shard",
    "start",
    "stats",
]


def run(
    main: Coroutine[Any, Any, T],
    *,
    shards: int | None = None,
    pin: bool = True,
    idle_poll: float = 200e-6,
    overprovisioned: bool | None = None,
    shutdown_timeout: float = 5.0,
    stall_threshold: float | None = 0.025,
    cpuset: str | Iterable[int] | None = None,
) -> T:
    """Runs ``main()`` on shard 0 (this thread) of a new runtime and returns
    its result.

    The other shards start on their own threads, pinned to cores when
    ``pin``; ``shards=None`` means ``SHARDLOOP_SHARDS`` or one per CPU of
    the cpuset. ``cpuset`` (Seastar's ``--cpuset``; default
    ``SHARDLOOP_CPUSET``, else every CPU the process may use) names the CPUs
    the shards run on, as a list (``[2, 3]``) or a CPU list string
    (``"0-3,8"``): pinned, shard ``i`` runs on its ``i``-th CPU; unpinned or
    overprovisioned, every shard may run on any of them. A CPU the process may not use
    (see ``os.sched_getaffinity``), one named twice, or fewer CPUs than
    shards without ``overprovisioned`` is a ValueError. An idle shard
    polls for ``idle_poll`` seconds before it sleeps.
    ``overprovisioned=True`` (or ``SHARDLOOP_OVERPROVISIONED=1``) is for
    shards that share their cores with other busy threads, such as a client
    on the same machine: shards are not pinned and yield their core while
    they poll or wait for the GIL, rather than spin.

    When ``main()`` returns, shard 0's other tasks are cancelled (as
    ``asyncio.run`` does), and calls still in flight between shards get
    ``shutdown_timeout`` seconds to finish, making further calls if they
    need to; what still runs then is cancelled and named in a
    ``RuntimeWarning``. Ctrl-C at any stage cancels the tasks of every shard,
    stops the runtime and raises ``KeyboardInterrupt``; a ``SystemExit`` or
    ``KeyboardInterrupt`` raised by code on any shard does the same and is
    raised here.

    A shard that runs Python for ``stall_threshold`` seconds (default 25 ms;
    None: off) without going back to its loop (one long task step,
    callback or plain function) is reported once through ``logging``
    (logger ``shardloop``, level WARNING): the shard, how long so far, the
    plain function it serves if any, and its thread's Python stack at the
    moment it was caught; then how long the stall lasted, when it ends.
    ``stats()`` counts each shard's stalls and its worst.
    """
    if asyncio.events._get_running_loop() is not None:
        # As asyncio.run: refuse before any runtime is built.
        raise RuntimeError("shardloop.run() cannot be called from a running event loop")
    factory = functools.partial(
        new_event_loop,
        shards,
        pin=pin,
        idle_poll=idle_poll,
        overprovisioned=overprovisioned,
        shutdown_timeout=shutdown_timeout,
        stall_threshold=stall_threshold,
        cpuset=cpuset,
    )
    runner = asyncio.Runner(loop_factory=factory)
    loop: ShardLoop | None = None
    try:
        made = runner.get_loop()
        assert isinstance(made, ShardLoop)
        loop = made
        try:
            return runner.run(main)
        except BaseException as exc:
            if isinstance(exc, Exception):
                raise
            # Ctrl-C or SystemExit here, or on another shard (main() was
            # then cancelled): every shard's tasks are cancelled at close.
            loop._cancel_on_close = True
            if isinstance(exc, asyncio.CancelledError):
                if loop._state.fatal is not None:
                    raise loop._state.fatal from None
                if loop._sigint_seen:
                    # Ctrl-C cancelled main() in the moment asyncio.Runner
                    # loses track of it (as it installs its handler).
                    raise KeyboardInterrupt from None
            raise
    finally:
        if loop is None or loop._runtime is None:
            runner.close()
        else:
            # From here Ctrl-C stops the shards at once and is raised at
            # the end, wherever in asyncio's clean-up it lands.
            with _CtrlCStops(loop._runtime) as ctrl_c:
                if not loop.is_closed():
                    loop._finish_served_calls(ctrl_c)
                runner.close()
            if ctrl_c.pressed:
                raise KeyboardInterrupt


def stats() -> dict[str, Any]:
    """The runtime's counters as plain dicts: ``queues`` (per ordered pair of
    shards: sent, received, completed, batches, depth and in_flight now,
    max_depth, max_pending) and
    ``shards`` (per shard: polls, tasks_run, sleeps, wakeups, and preempted:
    how often the kernel took the core from the shard while it could run)
    and ``groups`` (per service group and ordered pair of shards that has
    sent a call: max_inflight, in_flight, waiting, sent, waited,
    wait_seconds, max_wait_seconds)."""
    return current_loop()._driver.stats()
