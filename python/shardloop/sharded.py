"""Per-shard services and handles to objects owned by a shard.

:class:`Sharded` is Seastar's ``sharded<T>``: one instance of a class per
shard, each built, used and stopped on its own shard. :class:`ForeignRef` is
Seastar's ``foreign_ptr``: a handle that routes use of an object to the shard
that owns it, and releases the object there.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from . import shard
from ._loop import _running_loop

T = TypeVar("T")
R = TypeVar("R")


async def _resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class Sharded(Generic[T]):
    """One instance of ``cls(*args, **kwargs)`` per shard.

    >>> counters = Sharded(Counter)
    >>> await counters.start()                     # built on every shard
    >>> await counters.invoke_on(2, "add", 5)      # Counter.add on shard 2
    >>> total = await counters.map_reduce(lambda c: c.value, operator.add, 0)
    >>> await counters.stop()                      # each stop() on its shard
    """

    def __init__(self, cls: Callable[..., T], /, *args: Any, **kwargs: Any) -> None:
        self._factory = functools.partial(cls, *args, **kwargs)
        self._instances: list[T | None] = []
        self._started = False

    async def _build(self) -> None:
        instance = self._factory()
        start = getattr(instance, "start", None)
        if callable(start):
            await _resolve(start())
        self._instances[shard.id()] = instance

    async def start(self) -> Sharded[T]:
        """Builds the instance of every shard on that shard (calling its
        ``start()`` too, if it has one)."""
        if self._started:
            raise RuntimeError("this Sharded service is already started")
        self._instances = [None] * shard.count()
        await shard.invoke_on_all(self._build)
        self._started = True
        return self

    def local(self) -> T:
        """This shard's instance."""
        instance = self._instances[shard.id()] if self._started else None
        if instance is None:
            raise RuntimeError("the Sharded service is not started (await svc.start())")
        return instance

    async def _apply(self, fn: str | Callable[..., Any], args: Any, kwargs: Any) -> Any:
        instance = self.local()
        if isinstance(fn, str):
            return await _resolve(getattr(instance, fn)(*args, **kwargs))
        return await _resolve(fn(instance, *args, **kwargs))

    async def invoke_on(
        self, shard_id: int, fn: str | Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Any:
        """Calls a method (by name) or ``fn(instance, ...)`` on shard ``shard_id``."""
        return await shard.submit_to(shard_id, self._apply, fn, args, kwargs)

    async def invoke_on_all(
        self, fn: str | Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> list[Any]:
        """Like :meth:`invoke_on` on every shard; results in shard order."""
        return await shard.invoke_on_all(self._apply, fn, args, kwargs)

    async def map_reduce(
        self, mapper: str | Callable[..., Any], reducer: Callable[[R, Any], R], initial: R
    ) -> R:
        """Maps every shard's instance with ``mapper`` on its shard and folds
        the results, in shard order, with ``reducer`` starting at ``initial``."""
        return functools.reduce(reducer, await self.invoke_on_all(mapper), initial)

    async def _stop_local(self) -> None:
        instance = self._instances[shard.id()]
        self._instances[shard.id()] = None
        stop = getattr(instance, "stop", None)
        if callable(stop):
            await _resolve(stop())

    async def stop(self) -> None:
        """Calls every instance's ``stop()`` on its own shard and drops them."""
        if not self._started:
            return
        await shard.invoke_on_all(self._stop_local)
        self._started = False


class _Table:
    """The objects that ForeignRefs of one owner shard point at. Only the
    owner holds them, so the last reference always goes on the owner; only
    the owner touches its table."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}
        self.keys = itertools.count(1)


_tables: dict[int, _Table] = {}


def _table() -> _Table:
    return _tables.setdefault(shard.id(), _Table())


def _owned_here() -> dict[int, Any]:
    return _table().objects


def _release(key: int) -> None:
    """Runs on the owner shard: drops its reference to the object."""
    _owned_here().pop(key, None)


class ForeignRef(Generic[T]):
    """A handle to an object owned by the shard that made the handle
    (Seastar's ``foreign_ptr``).

    Use from any shard with :meth:`invoke`; :meth:`get` only on the owner.
    The owner keeps the object; the handle carries a key. When the handle
    dies, on any shard, the owner drops the object, so it is released there.
    """

    __slots__ = ("__weakref__", "_key", "_owner")

    def __init__(self, obj: T) -> None:
        self._owner = shard.id()
        table = _table()
        self._key = next(table.keys)
        table.objects[self._key] = obj

    @property
    def owner(self) -> int:
        """The shard that owns the object."""
        return self._owner

    def get(self) -> T:
        """The object itself; only on its owner shard."""
        if shard.id() != self._owner:
            raise RuntimeError(
                f"this object is owned by shard {self._owner}; use invoke() from other shards"
            )
        obj: T = _owned_here()[self._key]
        return obj

    async def invoke(self, fn: str | Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Calls a method (by name) or ``fn(obj, ...)`` on the owner shard."""
        return await shard.submit_to(self._owner, self._apply, fn, args, kwargs)

    async def _apply(self, fn: str | Callable[..., Any], args: Any, kwargs: Any) -> Any:
        obj = self.get()
        if isinstance(fn, str):
            return await _resolve(getattr(obj, fn)(*args, **kwargs))
        return await _resolve(fn(obj, *args, **kwargs))

    def __del__(self) -> None:
        loop = _running_loop()
        here = getattr(loop, "shard_id", None)
        if here == self._owner:
            _release(self._key)
            return
        if here is None:
            return  # no runtime here any more: the owner's table goes with it
        try:
            shard.submit_to(self._owner, _release, self._key)
        except Exception:
            pass  # shutting down: the owner's table goes with its shard

    def __repr__(self) -> str:
        return f"<ForeignRef owned by shard {self._owner}>"
