"""Service groups: a bound on the cross-shard calls in flight, Seastar's
``smp_service_group``.

Every call belongs to a group. Plain ``shard.submit_to`` uses the default
group, whose bound (``DEFAULT_MAX_INFLIGHT`` calls from one shard to each
other shard) no ordinary program meets; a service gives its own calls a
group of their own::

    lookups = ServiceGroup(max_inflight=64, name="lookups")
    value = await lookups.submit_to(owner, table.get, key)

Beyond the bound, a call waits on the calling shard, unsent and in order,
until an earlier call of the same group to the same shard is answered: the
caller's ``await`` is its back-pressure, and a flood of calls stays a queue
on its sender instead of filling the target's rings and delaying its
timers. ``stats()["groups"]`` shows, per group and ordered pair of shards,
the calls in flight and waiting, and how long they waited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from . import _shardloop, shard

DEFAULT_MAX_INFLIGHT: int = _shardloop.DEFAULT_MAX_INFLIGHT

__all__ = ["DEFAULT_MAX_INFLIGHT", "ServiceGroup"]


class ServiceGroup(_shardloop.ServiceGroup):
    """At most ``max_inflight`` calls of this group in flight from each shard
    to each shard (itself included); ``name`` labels it in ``stats()``.

    A group may be made anywhere (at import time, say) and used from every
    shard of every runtime: its bound applies to each ordered pair of
    shards separately. Errors are those of ``shard.submit_to``: ValueError
    for a shard that does not exist, ShutdownError once shutdown began
    (also for a call that was waiting when it began), and the called
    function's own exceptions.
    """

    async def invoke_on_all(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> list[Any]:
        """``shard.invoke_on_all`` within this group; results in shard order."""
        calls = [self.submit_to(i, fn, *args, **kwargs) for i in range(shard.count())]
        return list(await asyncio.gather(*calls))

    async def invoke_on_others(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> list[Any]:
        """``shard.invoke_on_others`` within this group; results in shard order."""
        me = shard.id()
        calls = [self.submit_to(i, fn, *args, **kwargs) for i in range(shard.count()) if i != me]
        return list(await asyncio.gather(*calls))

    def __repr__(self) -> str:
        return f"ServiceGroup(max_inflight={self.max_inflight}, name={self.name!r})"
