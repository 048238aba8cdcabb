"""Cross-shard calls: ``from shardloop import shard``.

>>> result = await shard.submit_to(3, lookup, key)   # runs on shard 3
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import _shardloop
from ._loop import current_loop

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["count", "id", "invoke_on_all", "invoke_on_others", "map_reduce", "submit_to"]


if TYPE_CHECKING:

    @overload
    def submit_to(
        shard_id: int, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any
    ) -> _shardloop.ShardFuture[T]: ...
    @overload
    def submit_to(
        shard_id: int, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> _shardloop.ShardFuture[T]: ...
    def submit_to(shard_id: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Runs ``fn(*args, **kwargs)`` on shard ``shard_id``; await the result."""
else:
    submit_to = _shardloop.submit_to


async def invoke_on_all(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> list[Any]:
    """Runs ``fn`` on every shard; returns the results in shard order.

    This shard's own call runs when the caller yields, after the others
    were sent (as with ``submit_to``), so it never holds them back.
    """
    calls = [submit_to(i, fn, *args, **kwargs) for i in range(current_loop().shard_count)]
    return list(await asyncio.gather(*calls))


async def invoke_on_others(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> list[Any]:
    """Runs ``fn`` on every shard but this one; results in shard order."""
    return await current_loop()._invoke_on_others(fn, *args, **kwargs)


def id() -> int:
    """The index of the current shard."""
    return current_loop().shard_id


def count() -> int:
    """The number of shards of the running runtime."""
    return current_loop().shard_count


async def map_reduce(mapper: Callable[[], Any], reducer: Callable[[R, Any], R], initial: R) -> R:
    """Runs ``mapper()`` on every shard (a plain or a coroutine function) and
    folds the results, in shard order, with ``reducer`` starting at
    ``initial``: Seastar's ``map_reduce`` over the shards, without a
    ``Sharded`` service.

    >>> total = await shard.map_reduce(count_local_keys, operator.add, 0)
    """
    return functools.reduce(reducer, await invoke_on_all(mapper), initial)
