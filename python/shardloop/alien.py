"""Calls into shards from threads that are not shards, and from other event
loops: Seastar's ``alien::submit_to``.

:func:`start` runs a runtime in the background and returns a
:class:`Runtime` handle. Any thread can send it work (a
``concurrent.futures.Future`` comes back), and any asyncio loop (uvicorn's,
Jupyter's, a plain ``asyncio.run``) can await it::

    with shardloop.start(shards=4) as rt:
        total = rt.submit_to(2, lookup, key).result()     # from a thread
        value = await rt.call(2, lookup, key)             # from another loop
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import Callable
from typing import Any

from . import _shardloop, shard
from ._shardloop import ShutdownError

__all__ = ["Runtime", "start"]


class Runtime:
    """A runtime running in the background; see :func:`start`.

    Its methods may be called from any thread that is not one of its
    shards. Errors are those of ``shard.submit_to``: ``ValueError`` (or
    ``TypeError``) for a shard that does not exist, raised at once;
    ``ShutdownError`` once the runtime is closed (or, through the future,
    once it began to shut down); the called function's own exceptions
    through the future.
    """

    def __init__(
        self,
        thread: threading.Thread,
        loop: asyncio.AbstractEventLoop,
        stop: asyncio.Future[None],
        count: int,
        failure: list[BaseException],
        stats: _shardloop.StatsReader,
    ) -> None:
        self._thread = thread
        self._stats = stats
        self._loop = loop
        self._stop = stop
        self._count = count
        self._failure = failure
        self._closed = False

    @property
    def shard_count(self) -> int:
        """The number of shards."""
        return self._count

    def submit_to(
        self, shard_id: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        """Runs ``fn(*args, **kwargs)`` on shard ``shard_id`` (a coroutine
        function as a task there); returns a ``concurrent.futures.Future``
        of its result."""
        _shardloop.check_shard(shard_id, self._count)
        return self._on_shard0(shard.submit_to, shard_id, fn, *args, **kwargs)

    async def call(
        self, shard_id: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Any:
        """Awaits ``fn(*args, **kwargs)`` run on shard ``shard_id``, from
        any asyncio loop; cancelling the await cancels the call."""
        future = self.submit_to(shard_id, fn, *args, **kwargs)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The call runs already, which a concurrent future cannot
            # cancel: cancel it on shard 0, as a caller there would.
            try:
                self._loop.call_soon_threadsafe(_cancel_started, future)
            except RuntimeError:
                pass  # stopped meanwhile: nothing runs any more
            raise

    def invoke_on_all(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[list[Any]]:
        """Runs ``fn`` on every shard; a future of the results in shard order."""

        def every_shard() -> asyncio.Future[list[Any]]:
            # Gathered calls, not a task: a shutdown gives calls in flight
            # their grace period, and cancels tasks.
            return asyncio.gather(
                *(shard.submit_to(i, fn, *args, **kwargs) for i in range(self._count))
            )

        return self._on_shard0(every_shard)

    def stats(self) -> dict[str, Any]:
        """``shardloop.stats()`` of the runtime, read from this thread
        without waiting for a shard (after ``close()``, the last values)."""
        return self._stats.read()

    @property
    def stats_reader(self) -> _shardloop.StatsReader:
        """Reads this runtime's counters from any thread (what
        ``shardloop.metrics.Collector(rt)`` reads)."""
        return self._stats

    def close(self) -> None:
        """Stops the runtime as ``shardloop.run`` stops it when ``main()``
        returns (calls in flight get the grace period), and waits for it.
        Raises what stopped the runtime, if something on a shard did
        (``SystemExit``, say). Closing again does nothing."""
        if threading.current_thread() is self._thread or _on_a_shard():
            raise RuntimeError("a runtime cannot be closed from a shard (it would wait for itself)")
        if not self._closed:
            self._closed = True
            try:
                self._loop.call_soon_threadsafe(_finish, self._stop)
            except RuntimeError:
                pass  # its loop is closed already: it stopped on its own
        self._thread.join()
        if self._failure:
            failure = self._failure.pop()
            raise failure

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed or not self._thread.is_alive() else "running"
        return f"<shardloop.Runtime {self._count} shards, {state}>"

    def _on_shard0(
        self, starter: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        """Has shard 0 call ``starter(*args, **kwargs)``, which returns an
        asyncio future of shard 0; its outcome becomes the returned future's."""
        if self._closed:
            raise ShutdownError("the runtime is closed")
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def begin() -> None:
            if not result.set_running_or_notify_cancel():
                return
            try:
                inner = asyncio.ensure_future(starter(*args, **kwargs))
            except BaseException as exc:
                result.set_exception(exc)
                return
            _STARTED[result] = inner
            inner.add_done_callback(lambda done: _copy_outcome(done, result))

        try:
            self._loop.call_soon_threadsafe(begin)
        except RuntimeError:
            raise ShutdownError("the runtime has stopped") from None
        return result


# The asyncio future on shard 0 behind each running call's concurrent
# future (only touched on shard 0).
_STARTED: weakref.WeakKeyDictionary[concurrent.futures.Future[Any], asyncio.Future[Any]] = (
    weakref.WeakKeyDictionary()
)


def _cancel_started(result: concurrent.futures.Future[Any]) -> None:
    inner = _STARTED.get(result)
    if inner is not None:
        inner.cancel()


def _copy_outcome(done: asyncio.Future[Any], result: concurrent.futures.Future[Any]) -> None:
    _STARTED.pop(result, None)
    if done.cancelled():
        result.set_exception(asyncio.CancelledError())
    elif (exc := done.exception()) is not None:
        result.set_exception(exc)
    else:
        result.set_result(done.result())


def _finish(stop: asyncio.Future[None]) -> None:
    if not stop.done():
        stop.set_result(None)


def _on_a_shard() -> bool:
    try:
        shard.id()
    except RuntimeError:
        return False
    return True


def start(shards: int | None = None, **options: Any) -> Runtime:
    """Starts a runtime in the background (shard 0 on a thread of its own,
    never pinned) and returns its :class:`Runtime` handle once every shard
    runs. ``options`` are those of ``shardloop.run`` (``idle_poll``,
    ``shutdown_timeout``, ``stall_threshold``, ``cpuset``, ...); its shards
    are not pinned, but a cpuset keeps them on its CPUs. Close it with
    ``rt.close()``, or use it as a context manager."""
    ready = threading.Event()
    started: dict[str, Any] = {}
    failure: list[BaseException] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        started["loop"] = loop
        started["stop"] = stop = loop.create_future()
        started["count"] = shard.count()
        started["stats"] = loop._driver.stats_reader()  # type: ignore[attr-defined]
        ready.set()
        await stop

    def body() -> None:
        from . import run  # (the package imports this module)

        coro = main()
        try:
            run(coro, shards=shards, **options)
        except BaseException as exc:
            failure.append(exc)
        finally:
            coro.close()  # (never started if the runtime could not start)
            ready.set()

    thread = threading.Thread(target=body, name="shardloop-runtime", daemon=True)
    thread.start()
    ready.wait()
    if "loop" not in started:
        thread.join()
        raise failure.pop()
    return Runtime(
        thread, started["loop"], started["stop"], started["count"], failure, started["stats"]
    )
