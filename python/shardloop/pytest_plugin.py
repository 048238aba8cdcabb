"""shardloop's pytest plugin (Seastar's ``SEASTAR_TEST_CASE``), loaded by
pytest through the ``pytest11`` entry point once shardloop is installed.

``@pytest.mark.shardloop`` runs an ``async def`` test on shard 0 of a
fresh runtime, as ``shardloop.run`` would run ``main()``::

    @pytest.mark.shardloop(shards=2)
    async def test_lookup():
        assert await shard.submit_to(1, lookup, "k") == 1

The marker takes ``shards`` (default 2), ``timeout`` (seconds, default 60)
and any other option of ``shardloop.run`` (``stall_threshold``,
``shutdown_timeout``, ``cpuset``, ...); the shards are unpinned unless it
says ``pin=True``. A test still running at its timeout fails with the
Python stack of every thread and every shard's tasks, and its runtime is
stopped as Ctrl-C stops it (by interrupting the main thread: a test run on
another thread, as some runners do, fails so only once it ends).

Fixtures:

- ``shardloop_runtime``: a :class:`shardloop.Runtime` running in the
  background (``shardloop.start``; the marker's ``shards`` if the test has
  one, else 2), closed after the test; for tests that are not on a shard,
  sync ones or those of pytest-asyncio (``await rt.call(i, fn)``).
- ``shardloop_server``: in a ``shardloop`` test, ``await
  shardloop_server(handler)`` starts ``shardloop.serve(handler)`` (or, with
  ``connections=True``, ``serve_connections``) on a free loopback port and
  returns the server (``server.port``); it is closed when the test ends.

It coexists with pytest-asyncio: tests marked ``asyncio`` run on its loop,
tests marked ``shardloop`` on a runtime, in auto mode too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import io
import signal
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator
from typing import Any

import pytest

import shardloop
from shardloop import shard

__all__ = ["ServerStarter"]

_MARKER = "shardloop"
_DEFAULT_SHARDS = 2
_DEFAULT_TIMEOUT = 60.0
# The options of shardloop.run that a marker may pass on.
_RUN_OPTIONS = frozenset(inspect.signature(shardloop.run).parameters) - {"main", "shards"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(shards={_DEFAULT_SHARDS}, timeout={_DEFAULT_TIMEOUT:g}, **run_options): "
        "run this async test on shard 0 of a fresh shardloop runtime (unpinned)",
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Generator[None, Any, Any]:
    """Gives ``shardloop`` tests back as plain test functions when another
    plugin (pytest-asyncio in auto mode) turned every coroutine test into
    one of its own, to run on its loop."""
    result = yield
    if not result:
        return result
    nodes = result if isinstance(result, list) else [result]
    return [_as_plain_function(node) for node in nodes]


def _as_plain_function(node: Any) -> Any:
    if (
        not isinstance(node, pytest.Function)
        or type(node) is pytest.Function
        or node.get_closest_marker(_MARKER) is None
    ):
        return node
    plain = pytest.Function.from_parent(
        node.parent,
        name=node.name,
        callspec=getattr(node, "callspec", None),
        callobj=node.obj,
        fixtureinfo=node._fixtureinfo,
        keywords={k: v for k, v in node.keywords.items() if k != "asyncio"},
        originalname=node.originalname,
    )
    plain.own_markers = [m for m in node.own_markers if m.name != "asyncio"]
    return plain


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    marker = pyfuncitem.get_closest_marker(_MARKER)
    if marker is None:
        return None
    test = pyfuncitem.obj
    if not inspect.iscoroutinefunction(test):
        raise pytest.UsageError(
            f"{pyfuncitem.nodeid}: @pytest.mark.{_MARKER} runs an async def test; "
            f"{pyfuncitem.name} is not one"
        )
    if marker.args:
        raise pytest.UsageError(
            f"{pyfuncitem.nodeid}: @pytest.mark.{_MARKER} takes keywords only "
            "(shards=, timeout=, and shardloop.run's options)"
        )
    options = dict(marker.kwargs)
    shards = options.pop("shards", _DEFAULT_SHARDS)
    timeout = options.pop("timeout", _DEFAULT_TIMEOUT)
    options.setdefault("pin", False)
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    starter = args.get("shardloop_server")
    assert starter is None or isinstance(starter, ServerStarter)
    unknown = sorted(set(options) - _RUN_OPTIONS)
    if unknown:
        raise pytest.UsageError(
            f"{pyfuncitem.nodeid}: @pytest.mark.{_MARKER} has no option {', '.join(unknown)} "
            f"(it takes shards=, timeout= and {', '.join(sorted(_RUN_OPTIONS))})"
        )
    deadline = _Deadline(timeout, pyfuncitem.nodeid)
    main = _test_main(test, args, starter, deadline)
    try:
        with deadline:
            shardloop.run(main, shards=shards, **options)
    except KeyboardInterrupt:
        if deadline.stacks is None:
            raise
    finally:
        main.close()  # (never started if the runtime could not start)
    if deadline.stacks is not None:
        pytest.fail(
            f"{pyfuncitem.nodeid} still ran after {timeout:g} s; every thread's stack "
            f"and every shard's tasks then:\n{deadline.stacks}",
            pytrace=False,
        )
    return True


async def _test_main(
    test: Callable[..., Coroutine[Any, Any, Any]],
    args: dict[str, Any],
    starter: ServerStarter | None,
    deadline: _Deadline,
) -> None:
    deadline.shard0 = asyncio.get_running_loop()
    try:
        await test(**args)
    finally:
        if starter is not None:
            await starter.close_all()


# After the first interrupt, how often and how many times more the main
# thread is interrupted: asyncio's handler only cancels main() at the
# first, which a test blocked in a call (time.sleep, say) does not see.
_INTERRUPT_EVERY = 1.0
_INTERRUPTS = 5


class _Deadline:
    """Past ``seconds``, notes every thread's Python stack and interrupts the
    main thread as Ctrl-C does, which stops the runtime (again each second,
    as a second Ctrl-C would, until it has)."""

    def __init__(self, seconds: float, what: str) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
            raise pytest.UsageError(
                f"{what}: timeout must be a positive number of seconds, not {seconds!r}"
            )
        self.stacks: str | None = None
        # Shard 0's loop, once the test runs: asked for every shard's tasks.
        self.shard0: asyncio.AbstractEventLoop | None = None
        self._seconds = seconds
        self._over = threading.Event()
        # Held to interrupt, and to say the test is over: no interrupt is
        # sent once __exit__ has returned.
        self._lock = threading.Lock()
        self._watch = threading.Thread(target=self._expire, name="shardloop-test-deadline")
        self._watch.daemon = True
        self._main = threading.get_ident()

    def _expire(self) -> None:
        if self._over.wait(self._seconds):
            return
        stacks = _every_stack() + "\n" + _every_task(self.shard0)
        if threading.main_thread().ident != self._main:
            self.stacks = stacks
            return  # only the main thread can be interrupted
        for _ in range(1 + _INTERRUPTS):
            with self._lock:
                if self._over.is_set():
                    return  # it ended meanwhile: in time after all
                self.stacks = stacks
                signal.pthread_kill(self._main, signal.SIGINT)
            if self._over.wait(_INTERRUPT_EVERY):
                return

    def __enter__(self) -> _Deadline:
        self._watch.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._over.set()
        self._watch.join()


def _every_stack() -> str:
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue  # (the timer's own)
        name = names.get(ident, "a thread started outside Python (a shard)")
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"--- thread {ident} ({name}):\n{stack}")
    return "\n".join(parts)


# How long the shards have to describe their tasks when a test times out.
_DESCRIBE_LIMIT = 1.0


def _every_task(shard0: asyncio.AbstractEventLoop | None) -> str:
    """Where every task of every shard waits, as each shard tells (one
    busy in Python cannot: its thread's stack above says where it is)."""
    if shard0 is None or shard0.is_closed():
        return "(the runtime had not started or had stopped: no tasks)"
    try:
        told = asyncio.run_coroutine_threadsafe(_describe_shards(), shard0)
    except RuntimeError:  # closed meanwhile
        return "(the runtime had stopped: no tasks)"
    try:
        return told.result(_DESCRIBE_LIMIT * 2)
    except concurrent.futures.TimeoutError:
        told.cancel()
        return "(shard 0 is busy: its tasks cannot be listed)"
    except BaseException as exc:  # (cancelled as the runtime stopped, say)
        return f"(the shards' tasks could not be listed: {exc!r})"


_DESCRIBING = "shardloop-test-describe"


async def _describe_shards() -> str:
    asyncio.current_task().set_name(_DESCRIBING)  # type: ignore[union-attr]
    calls = [shard.submit_to(i, _describe_tasks) for i in range(shard.count())]
    # (A ShardFuture is a future to asyncio, though not to typeshed.)
    await asyncio.wait(calls, timeout=_DESCRIBE_LIMIT)  # type: ignore[type-var]
    parts = []
    for i, call in enumerate(calls):
        if call.done() and call.exception() is None:
            parts.append(call.result())
        else:
            call.cancel()
            parts.append(f"=== shard {i}: busy, its tasks cannot be listed\n")
    return "\n".join(parts)


def _describe_tasks() -> str:
    """On a shard: the stack of each of its tasks (but the one asking)."""
    tasks = [task for task in asyncio.all_tasks() if task.get_name() != _DESCRIBING]
    text = io.StringIO()
    text.write(f"=== shard {shard.id()}: {len(tasks)} task(s)\n")
    for task in tasks:
        task.print_stack(file=text)
    return text.getvalue()


class ServerStarter:
    """What the ``shardloop_server`` fixture gives a ``shardloop`` test:
    ``await shardloop_server(handler)`` starts a server on a free loopback
    port, closed when the test ends."""

    def __init__(self) -> None:
        self._servers: list[shardloop.ShardedServer] = []

    async def __call__(
        self,
        handler: Callable[..., Awaitable[None]],
        *,
        connections: bool = False,
        **options: Any,
    ) -> shardloop.ShardedServer:
        """``shardloop.serve(handler, "127.0.0.1", 0, **options)``, or
        ``serve_connections`` with ``connections=True``."""
        serve = shardloop.serve_connections if connections else shardloop.serve
        server = await serve(handler, "127.0.0.1", 0, **options)
        self._servers.append(server)
        return server

    async def close_all(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            await server.close()


@pytest.fixture
def shardloop_server(request: pytest.FixtureRequest) -> ServerStarter:
    """Starts servers on free loopback ports in a ``shardloop`` test:
    ``server = await shardloop_server(handler)``; closed when it ends."""
    if request.node.get_closest_marker(_MARKER) is None:
        raise pytest.UsageError(
            f"{request.node.nodeid}: shardloop_server serves from the shards of a "
            f"@pytest.mark.{_MARKER} test"
        )
    return ServerStarter()


@pytest.fixture
def shardloop_runtime(request: pytest.FixtureRequest) -> Iterator[shardloop.Runtime]:
    """A runtime running in the background (``shardloop.start``), closed
    after the test; the test's ``shardloop`` marker sets its ``shards``."""
    marker = request.node.get_closest_marker(_MARKER)
    shards = marker.kwargs.get("shards", _DEFAULT_SHARDS) if marker else _DEFAULT_SHARDS
    with shardloop.start(shards=shards, pin=False) as runtime:
        yield runtime
