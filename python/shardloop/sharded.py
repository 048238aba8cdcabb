"""Per-shard services and handles to objects owned by a shard.

:class:`Sharded` is Seastar's ``sharded<T>``: one instance of a class per
shard, each built, used and stopped on its own shard. :class:`ForeignRef` is
Seastar's ``foreign_ptr``: a handle that routes use of an object to the shard
that owns it, and releases the object there.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from . import shard
from ._loop import ShardLoop, _running_loop, current_loop
from ._shardloop import ShardFuture
from .groups import ServiceGroup

T = TypeVar("T")
R = TypeVar("R")


async def _resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class _Calls(Protocol):
    """The calling verbs of the module ``shard`` and of a ServiceGroup."""

    def submit_to(self, shard_id: int, fn: Callable[..., Any], /, *args: Any) -> Any: ...
    async def invoke_on_all(self, fn: Callable[..., Any], /, *args: Any) -> list[Any]: ...
    async def invoke_on_others(self, fn: Callable[..., Any], /, *args: Any) -> list[Any]: ...


class Sharded(Generic[T]):
    """One instance of ``cls(*args, **kwargs)`` per shard.

    >>> counters = Sharded(Counter)
    >>> await counters.start()                     # built on every shard
    >>> await counters.invoke_on(2, "add", 5)      # Counter.add on shard 2
    >>> total = await counters.map_reduce(lambda c: c.value, operator.add, 0)
    >>> await counters.stop()                      # each stop() on its shard

    ``group`` (a :class:`~shardloop.ServiceGroup`) bounds the calls of
    ``invoke_on``, ``invoke_on_all``, ``invoke_on_others`` and
    ``map_reduce``; it is not passed to ``cls`` (pass a ``group`` argument
    of ``cls`` with ``functools.partial``).
    """

    def __init__(
        self,
        cls: Callable[..., T],
        /,
        *args: Any,
        group: ServiceGroup | None = None,
        **kwargs: Any,
    ) -> None:
        if group is not None and not isinstance(group, ServiceGroup):
            raise TypeError(f"group must be a ServiceGroup, not {type(group).__name__}")
        self._factory = functools.partial(cls, *args, **kwargs)
        # What sends the service's invocations: the group, or the module
        # `shard` (the default group); both have the same three verbs.
        self._calls: _Calls = shard if group is None else group
        self._instances: list[T | None] = []
        self._started = False
        self._busy: str | None = None  # "starting" or "stopping" while one runs

    async def _build(self) -> None:
        instance = self._factory()
        start = getattr(instance, "start", None)
        if callable(start):
            await _resolve(start())
        self._instances[shard.id()] = instance

    async def start(self) -> Sharded[T]:
        """Builds the instance of every shard on that shard (calling its
        ``start()`` too, if it has one).

        If building fails on any shard, the instances already built are
        stopped (each ``stop()`` on its shard), and the first failure, in
        shard order, is raised (as Seastar's ``sharded::start`` does).
        """
        if self._started or self._busy is not None:
            raise RuntimeError(f"this Sharded service is already {self._busy or 'started'}")
        self._busy = "starting"
        try:
            return await self._start()
        finally:
            self._busy = None

    async def _start(self) -> Sharded[T]:
        self._instances = [None] * shard.count()
        calls = _calls_in_shard_order(self._build)
        try:
            results = await asyncio.gather(*calls, return_exceptions=True)
        except BaseException:  # cancelled while building: roll back too
            await asyncio.gather(*calls, return_exceptions=True)
            # The cancels went out before these: once each shard has run
            # one more turn, the builds cancelled there have ended.
            await asyncio.gather(
                *(shard.submit_to(i, _one_turn) for i in range(len(calls))),
                return_exceptions=True,
            )
            await self._roll_back()
            raise
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self._roll_back()
            raise failures[0]
        self._started = True
        return self

    async def _roll_back(self) -> None:
        """Stops the instances a failed start built, each on its shard; a
        stop() that fails is logged (logger ``shardloop``)."""
        built = [i for i, instance in enumerate(self._instances) if instance is not None]
        results = await asyncio.gather(
            *(shard.submit_to(i, self._stop_local) for i in built), return_exceptions=True
        )
        self._instances = []
        for i, result in zip(built, results, strict=True):
            if isinstance(result, BaseException):
                logging.getLogger("shardloop").error(
                    "stopping the instance of shard %d after a failed start failed",
                    i,
                    exc_info=result,
                )

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
        return await self._calls.submit_to(shard_id, self._apply, fn, args, kwargs)

    async def invoke_on_all(
        self, fn: str | Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> list[Any]:
        """Like :meth:`invoke_on` on every shard; results in shard order."""
        return await self._calls.invoke_on_all(self._apply, fn, args, kwargs)

    async def invoke_on_others(
        self, fn: str | Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> list[Any]:
        """Like :meth:`invoke_on` on every shard but this one; results in
        shard order."""
        return await self._calls.invoke_on_others(self._apply, fn, args, kwargs)

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
        """Calls every instance's ``stop()`` on its own shard and drops them.
        While ``start()`` or another ``stop()`` runs: ``RuntimeError``."""
        if self._busy is not None:
            raise RuntimeError(f"this Sharded service is {self._busy}; await that first")
        if not self._started:
            return
        self._busy = "stopping"
        try:
            await shard.invoke_on_all(self._stop_local)
            self._started = False
        finally:
            self._busy = None


async def _one_turn() -> None:
    await asyncio.sleep(0)


def _calls_in_shard_order(fn: Callable[[], Any]) -> list[ShardFuture[Any]]:
    """``fn`` on every shard (the others' calls sent first, as
    ``invoke_on_all`` does); the futures in shard order."""
    me, count = shard.id(), shard.count()
    calls = {i: shard.submit_to(i, fn) for i in range(count) if i != me}
    calls[me] = shard.submit_to(me, fn)
    return [calls[i] for i in range(count)]


# The objects ForeignRefs point at live in their owner shard's loop
# (``ShardLoop._foreign``): only the owner holds them, so the last reference
# always goes on the owner, and they are released when that loop closes, so
# nothing outlives its runtime.


def _release(key: int) -> None:
    """Runs on the owner shard: drops its reference to the object."""
    current_loop()._foreign.pop(key, None)


class ForeignRef(Generic[T]):
    """A handle to an object owned by the shard that made the handle
    (Seastar's ``foreign_ptr``).

    Use from any shard with :meth:`invoke`; :meth:`get` only on the owner.
    The owner keeps the object; the handle carries a key. When the handle
    dies, on any shard, the owner drops the object, so it is released there.
    """

    __slots__ = ("__weakref__", "_key", "_owner", "_runtime")

    def __init__(self, obj: T) -> None:
        loop = current_loop()
        self._owner = loop.shard_id
        # The runtime's shared state tells it from later ones (a plain
        # reference: weak references to objects of other threads can fail
        # on free-threaded CPython).
        self._runtime = loop._state
        self._key = next(loop._foreign_keys)
        loop._foreign[self._key] = obj

    @property
    def owner(self) -> int:
        """The shard that owns the object."""
        return self._owner

    def _owner_loop(self) -> ShardLoop | None:
        """The running loop of this thread if it is the owner's."""
        loop = _running_loop()
        if isinstance(loop, ShardLoop) and loop._state is self._runtime:
            if loop.shard_id == self._owner:
                return loop
        return None

    def get(self) -> T:
        """The object itself; only on its owner shard."""
        loop = current_loop()
        if loop._state is not self._runtime:
            raise RuntimeError("this ForeignRef belongs to a runtime that has ended")
        if loop.shard_id != self._owner:
            raise RuntimeError(
                f"this object is owned by shard {self._owner}; use invoke() from other shards"
            )
        obj: T = loop._foreign[self._key]
        return obj

    async def invoke(self, fn: str | Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Calls a method (by name) or ``fn(obj, ...)`` on the owner shard."""
        if current_loop()._state is not self._runtime:
            raise RuntimeError("this ForeignRef belongs to a runtime that has ended")
        return await shard.submit_to(self._owner, self._apply, fn, args, kwargs)

    async def _apply(self, fn: str | Callable[..., Any], args: Any, kwargs: Any) -> Any:
        obj = self.get()
        if isinstance(fn, str):
            return await _resolve(getattr(obj, fn)(*args, **kwargs))
        return await _resolve(fn(obj, *args, **kwargs))

    def __del__(self) -> None:
        try:
            self._let_go()
        except Exception:
            pass  # the interpreter is finalizing: modules are half gone

    def _let_go(self) -> None:
        owner = self._owner_loop()
        if owner is not None:
            owner._foreign.pop(self._key, None)
            return
        if getattr(_running_loop(), "_state", None) is not self._runtime:
            # Off its runtime (or after it): the owner's loop releases the
            # object when it closes.
            return
        try:
            shard.submit_to(self._owner, _release, self._key)
        except Exception:
            pass  # shutting down: the owner releases it when its loop closes

    def __repr__(self) -> str:
        return f"<ForeignRef owned by shard {self._owner}>"
