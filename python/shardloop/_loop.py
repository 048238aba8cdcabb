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
import functools
import inspect
import itertools
import os
import selectors
import signal
import socket
import sys
import threading
import warnings
import weakref
from asyncio import format_helpers
from asyncio.log import logger as _asyncio_logger
from collections.abc import Callable, Coroutine, Iterable
from contextvars import Context
from typing import Any, TypeVar

from . import _shardloop, _stall

T = TypeVar("T")

_running_loop = asyncio.events._get_running_loop


class _ShardSelector(selectors.EpollSelector):
    """An epoll selector whose blocking wait happens in the shard's driver.

    The driver watches this selector's epoll descriptor (edge-triggered), so
    the selector only asks its own epoll set for events when that descriptor
    signalled, or when the previous look found events (some may remain: the
    set is level-triggered). That saves a syscall on most turns. The loop's
    turn (the Rust scheduler) does the same: it polls or waits through the
    driver itself while ``_look`` is false, and calls ``ready_now`` when the
    wait signalled.
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
        elif self._driver.wait(self._loop, timeout):
            return self.ready_now()
        else:
            signalled = False
        self._look = bool(ready) or signalled
        return ready

    def ready_now(self) -> list[tuple[selectors.SelectorKey, int]]:
        """The events of the epoll set, after the driver's wait found it
        readable."""
        ready = super().select(0)
        self._look = bool(ready)
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

    # Until it is whole, a loop interrupted in its construction (Ctrl-C at
    # start-up) is one that never opened: its __del__ then has nothing to
    # say. A class default, as the signal may land before __init__'s first
    # line has run; BaseEventLoop.__init__ sets the instance's own.
    _closed = True

    def __init__(
        self,
        driver: _shardloop.Driver,
        runtime: _shardloop.Runtime | None = None,
        state: _RuntimeState | None = None,
    ) -> None:
        try:
            self._setup(driver, runtime, state)
        except BaseException:
            self._closed = True
            if getattr(self, "_old_wakeup_fd", None) is not None:
                self._restore_wakeup_fd()
            selector = getattr(self, "_selector", None)
            if selector is not None:
                selector.close()
            raise

    def _setup(
        self,
        driver: _shardloop.Driver,
        runtime: _shardloop.Runtime | None,
        state: _RuntimeState | None,
    ) -> None:
        self._driver = driver
        self._runtime = runtime
        self._state = state if state is not None else _RuntimeState()
        self._stopped: asyncio.Future[None] | None = None
        self._old_wakeup_fd: int | None = None
        self._cancel_on_close = False
        self._closing = False
        self._sigint_seen = False
        self._thread = threading.get_ident()
        # The objects this shard owns through ForeignRefs, by key; released
        # when the loop closes.
        self._foreign: dict[int, Any] = {}
        self._foreign_keys = itertools.count(1)
        super().__init__(selector=_ShardSelector(driver, self))
        # The ready queue, the timers and the turn itself live in Rust
        # (rust/bindings/src/turn/); asyncio's _ready deque stays as the queue that
        # call_soon_threadsafe fills from other threads.
        own_clock = type(self).time is asyncio.BaseEventLoop.time
        self._turn = driver.scheduler(
            self,
            self._ready,  # type: ignore[attr-defined]
            own_clock,
            self._clock_resolution,  # type: ignore[attr-defined]
        )
        self._install_turn()
        if driver.shard_id == 0:
            self._state.shard0 = self
        if runtime is not None and threading.current_thread() is threading.main_thread():
            # The shard waits in Rust, where Python cannot see a signal; the
            # C-level handler's write to this loop's self-pipe wakes the
            # shard so that Python runs the handler (Ctrl-C included).
            # (_csock is the write end of the self-pipe of every selector loop.)
            self_pipe = self._csock  # type: ignore[attr-defined]
            self._old_wakeup_fd = signal.set_wakeup_fd(self_pipe.fileno())
        if runtime is not None:
            _open_runtimes.add(self)

    # -- The loop's turn: its methods are the Rust scheduler's, installed on
    # the instance so that a call costs no Python frame. In debug mode (and
    # for what a subclass replaced) the class's methods below run instead:
    # asyncio's checks, then the scheduler.

    def _install_turn(self) -> None:
        turn: _shardloop.Scheduler | None = getattr(self, "_turn", None)
        if turn is None:  # asyncio's __init__ sets the debug mode first
            return
        fast = {
            "call_soon": turn.call_soon,
            "call_later": turn.call_later,
            "call_at": turn.call_at,
            "_run_once": turn.run_once,
        }
        turn.set_debug(self._debug)  # type: ignore[attr-defined]
        cls = type(self)
        for name, method in fast.items():
            current = self.__dict__.get(name)
            if current is not None and current != method:
                continue  # the user's own, set on the instance: kept
            replaced = getattr(cls, name) is not getattr(ShardLoop, name)
            if self._debug or replaced:  # type: ignore[attr-defined]
                self.__dict__.pop(name, None)
            else:
                self.__dict__[name] = method

    def set_debug(self, enabled: bool) -> None:
        super().set_debug(enabled)
        self._install_turn()

    def call_soon(  # type: ignore[override]
        self, callback: Callable[..., object], *args: Any, context: Context | None = None
    ) -> _shardloop.Handle:
        self._check_closed()  # type: ignore[attr-defined]
        if self._debug:  # type: ignore[attr-defined]
            self._check_thread()  # type: ignore[attr-defined]
            self._check_callback(callback, "call_soon")  # type: ignore[attr-defined]
        handle = self._turn.call_soon(callback, *args, context=context)
        self._trace(handle)
        return handle

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: Context | None = None,
    ) -> _shardloop.TimerHandle:
        if delay is None:
            raise TypeError("delay must not be None")
        timer = self.call_at(self.time() + delay, callback, *args, context=context)
        self._trace(timer)
        return timer

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: Context | None = None,
    ) -> _shardloop.TimerHandle:
        if when is None:
            raise TypeError("when cannot be None")
        self._check_closed()  # type: ignore[attr-defined]
        if self._debug:  # type: ignore[attr-defined]
            self._check_thread()  # type: ignore[attr-defined]
            self._check_callback(callback, "call_at")  # type: ignore[attr-defined]
        timer = self._turn.call_at(when, callback, *args, context=context)
        self._trace(timer)
        return timer

    def _trace(self, handle: _shardloop.Handle) -> None:
        """In debug mode, where ``handle`` was made: the stack of the caller
        of the ``call_*`` method that called this (asyncio's
        ``_source_traceback``)."""
        if self._debug:  # type: ignore[attr-defined]
            handle._source_traceback = format_helpers.extract_stack(sys._getframe(2))

    def _call_soon(
        self, callback: Callable[..., object], args: tuple[Any, ...], context: Context | None
    ) -> Any:
        # call_soon_threadsafe's: from the loop's own thread the callback
        # keeps its place among the others; from another thread it goes to
        # asyncio's deque, which the next turn empties.
        if threading.get_ident() != self._thread:
            handle = super()._call_soon(callback, args, context)  # type: ignore[misc]
            if handle._source_traceback:
                del handle._source_traceback[-1]  # this method's own frame
            return handle
        handle = self._turn.call_soon(callback, *args, context=context)
        self._trace(handle)  # call_soon_threadsafe then drops its own frame
        return handle

    def _add_callback(self, handle: asyncio.Handle) -> None:
        self._turn.add_callback(handle)

    def _run_once(self) -> None:
        self._turn.run_once()

    def _run_debug(self, handle: Any) -> None:
        """Runs ``handle`` as asyncio's turn does in debug mode: noted as
        the current handle, and timed (a slow callback is logged)."""
        if handle._cancelled:
            return
        try:
            self._current_handle = handle
            start = self.time()
            handle._run()
            took = self.time() - start
            if took >= self.slow_callback_duration:
                _asyncio_logger.warning(
                    "Executing %s took %.3f seconds",
                    asyncio.base_events._format_handle(handle),  # type: ignore[attr-defined]
                    took,
                )
        finally:
            self._current_handle = None
            # This frame may outlive the call (a coroutine's frame kept by an
            # exception links back to it): it must not keep the handle.
            handle = None

    def _callback_failed(self, handle: _shardloop.Handle, exc: BaseException) -> None:
        """Reports an exception a callback raised, as asyncio's handles do."""
        source = _callback_source(handle._callback, handle._args, self._debug)  # type: ignore[attr-defined]
        context: dict[str, Any] = {
            "message": f"Exception in callback {source}",
            "exception": exc,
            "handle": handle,
        }
        if handle._source_traceback:
            context["source_traceback"] = handle._source_traceback
        self.call_exception_handler(context)

    def _handle_repr(self, handle: _shardloop.Handle) -> str:
        """The repr of a handle of this loop, as asyncio writes it."""
        if handle._repr is not None:
            return handle._repr
        info = asyncio.Handle._repr_info(handle)  # type: ignore[attr-defined]
        if isinstance(handle, _shardloop.TimerHandle):
            info.insert(2 if handle._cancelled else 1, f"when={handle._when}")
        return "<{}>".format(" ".join(info))

    def _close_loop(self) -> None:
        """asyncio's close; the callbacks and timers left are dropped."""
        try:
            super().close()
        finally:
            self._turn.close()

    @property
    def shard_id(self) -> int:
        """The index of this loop's shard."""
        return self._driver.shard_id

    @property
    def shard_count(self) -> int:
        """The number of shards of this loop's runtime."""
        return self._driver.shard_count

    async def _invoke_on_others(self, fn: Any, /, *args: Any, **kwargs: Any) -> list[Any]:
        """``shard.invoke_on_others`` from this loop's shard."""
        me = self.shard_id
        calls = [
            _shardloop.submit_to(i, fn, *args, **kwargs) for i in range(self.shard_count) if i != me
        ]
        return list(await asyncio.gather(*calls))

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

    def _process_self_data(self, data: bytes) -> None:
        # The C signal handler writes the signal's number to the self-pipe
        # (the wakeup fd): note Ctrl-C even where asyncio.Runner loses it.
        if signal.SIGINT in data:
            self._sigint_seen = True
        super()._process_self_data(data)  # type: ignore[misc]

    def _fatal(self, exc: BaseException) -> None:
        """On shard 0: another shard's loop was stopped by ``exc``
        (``SystemExit`` or ``KeyboardInterrupt`` raised by user code there).
        The whole runtime stops: every task of this shard is cancelled,
        ``main()`` included, and ``run()`` raises ``exc``."""
        if self._state.fatal is None:
            self._state.fatal = exc
        self._cancel_on_close = True
        if self._closing:
            return  # the drain sees it and stops the runtime
        for task in asyncio.all_tasks(self):
            task.cancel()

    def run_forever(self) -> None:
        # While this loop runs, its shard is the thread's current one.
        self._driver.activate(self)
        try:
            super().run_forever()
        except (KeyboardInterrupt, SystemExit):
            # Whatever stage this was (main(), the cancellation of its tasks,
            # the drain), the runtime now stops without waiting.
            self._cancel_on_close = True
            raise
        finally:
            self._driver.deactivate()

    def _until_stopped(self) -> asyncio.Future[None]:
        """A future that completes once shutdown lets this shard stop."""
        if self._stopped is None:
            self._stopped = self.create_future()
        return self._stopped

    def close(self) -> None:
        """Closes the loop; on shard 0 this shuts the whole runtime down.

        Tasks that serve no call are cancelled on every shard (as
        ``asyncio.run`` cancels the tasks left when ``main()`` returns);
        calls still in flight get ``shutdown_timeout`` seconds to finish,
        and may make calls of their own meanwhile; what still runs then is
        cancelled and named in a ``RuntimeWarning``. After Ctrl-C, or a
        ``SystemExit`` on any shard, nothing is waited for: every shard's
        tasks are cancelled at once. Ctrl-C during the shutdown does the
        same, and ``KeyboardInterrupt`` is raised once the runtime is down.
        """
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        runtime = self._runtime
        if runtime is None:
            self._release_foreign()
            self._close_loop()
            return
        self._closing = True
        try:
            with _CtrlCStops(runtime) as ctrl_c:
                failure = self._shut_down(runtime, ctrl_c)
        finally:
            if self._state.watchdog is not None:
                self._state.watchdog.stop()
        if ctrl_c.pressed:
            raise KeyboardInterrupt
        if failure is None:
            # SystemExit or KeyboardInterrupt raised by code on a shard.
            failure = self._state.fatal
        if failure is not None:
            raise failure

    def _shut_down(self, runtime: _shardloop.Runtime, ctrl_c: _CtrlCStops) -> BaseException | None:
        """Drains, stops and joins the runtime; returns what went wrong."""
        failure: BaseException | None = None
        # Another loop may be running on this thread (this one was made and
        # closed inside it): then nothing can serve this shard's calls.
        can_run = asyncio.events._get_running_loop() is None
        try:
            if can_run and not ctrl_c.pressed:
                self._drain(runtime, ctrl_c)
            else:
                runtime.force_stop()
        except BaseException as exc:
            failure = exc
            runtime.force_stop()
        try:
            runtime.begin_shutdown()
            if can_run:
                # Serve this shard until every shard is done with its calls.
                if not _run_to_end(self, self._until_stopped_within(_CANCEL_WAIT)):
                    runtime.force_stop()
                    _run_to_end(self, self._until_stopped_within(_CANCEL_WAIT))
                _cancel_remaining(self)
        except BaseException as exc:
            failure = failure or exc
            runtime.force_stop()
        finally:
            self._restore_wakeup_fd()
            self._release_foreign()
            self._close_loop()
            self._restore_wakeup_fd()  # asyncio's close may have cleared it
            self._old_wakeup_fd = None
            self._driver.close()
            _open_runtimes.discard(self)
            self._state.shard0 = None
        try:
            runtime.shutdown(_CANCEL_WAIT / 2)
        except BaseException as exc:
            failure = failure or exc
        return failure

    def _finish_served_calls(self, ctrl_c: _CtrlCStops) -> None:
        """On shard 0, when ``main()`` is done and before ``asyncio.Runner``
        cancels every task of this loop: cancels the tasks that serve no
        call, and lets the calls this shard serves for other shards finish,
        as every other shard lets its own finish during the drain. The
        grace period starts here and the drain has what is left of it."""
        self._state.grace_ends = self.time() + self._state.shutdown_timeout
        if self._cancel_on_close or self._state.fatal is not None or ctrl_c.pressed:
            return
        _run_to_end(self, self._until_served(ctrl_c))

    async def _until_served(self, ctrl_c: _CtrlCStops) -> None:
        """Cancels the tasks that serve no call, on every shard (so that
        servers elsewhere stop sending this shard work), and waits until
        this shard serves no call, within the grace period."""
        _cancel_background()
        # Sent, not waited for: a shard busy in a plain function, or one that
        # Ctrl-C stopped, may never answer.
        others = self.create_task(self._invoke_on_others(_cancel_background))
        others.add_done_callback(_quietly)
        while not ctrl_c.pressed and self._state.fatal is None:
            running = [t for t in _shardloop.call_tasks() if not t.done()]
            left = self._state.grace_ends - self.time()  # type: ignore[operator]
            if not running or left <= 0:
                return
            await asyncio.wait(running, timeout=min(left, _QUIET_POLL * 10))

    def _drain(self, runtime: _shardloop.Runtime, ctrl_c: _CtrlCStops) -> None:
        """Cancels the tasks that serve no call, on every shard, then waits
        (serving this shard) until no call is in flight between shards, for
        at most the grace period; then cancels what still runs."""
        if self._cancel_on_close or self._state.fatal is not None or ctrl_c.pressed:
            runtime.force_stop()
            return
        # Sent, not waited for: the wait for quiet below covers these calls.
        background = self.create_task(self._invoke_on_others(_cancel_background))
        limit = self._state.shutdown_timeout
        if self._state.grace_ends is not None:
            limit = max(0.0, self._state.grace_ends - self.time())
        quiet = _run_to_end(self, self._until_quiet(runtime, limit, ctrl_c))
        background.cancel()  # done by now, unless a shard is stuck
        if quiet:
            return
        if ctrl_c.pressed:
            return
        # Past the grace period: cancel what still runs, on every shard.
        cancelled = _run_to_end(self, _within(self._invoke_on_others(_cancel_tasks), _CANCEL_WAIT))
        if cancelled is None:
            what = "a shard busy in a plain function did not answer"
        else:
            what = ", ".join(f"shard {i}: {t}" for i, on in enumerate(cancelled, 1) for t in on)
        warnings.warn(
            f"shardloop: calls still running {self._state.shutdown_timeout:g} s after the "
            "runtime began to "
            f"shut down were cancelled: {what or 'none'}",
            RuntimeWarning,
            stacklevel=4,
        )
        if cancelled is None or not _run_to_end(
            self, self._until_quiet(runtime, _CANCEL_WAIT, ctrl_c)
        ):
            runtime.force_stop()

    async def _until_quiet(
        self, runtime: _shardloop.Runtime, limit: float, ctrl_c: _CtrlCStops
    ) -> bool:
        """Whether no call was in flight between shards within ``limit`` s
        (False at once after Ctrl-C)."""
        deadline = self.time() + limit
        while not runtime.is_quiet():
            if self._state.fatal is not None:
                raise self._state.fatal
            if ctrl_c.pressed or self.time() >= deadline:
                return False
            await asyncio.sleep(_QUIET_POLL)
        return True

    async def _until_stopped_within(self, limit: float) -> bool:
        """Whether shutdown let every shard stop within ``limit`` s."""
        done, _ = await asyncio.wait({self._until_stopped()}, timeout=limit)
        return bool(done)

    def _restore_wakeup_fd(self) -> None:
        """Gives the signal wakeup descriptor back to what had it before."""
        if self._old_wakeup_fd is None:
            return
        try:
            signal.set_wakeup_fd(self._old_wakeup_fd)
        except (OSError, ValueError):  # that descriptor was closed since
            signal.set_wakeup_fd(-1)

    def _release_foreign(self) -> None:
        """Drops the objects this shard owned through ForeignRefs, and lets
        go of the transports left open (each closes its socket, with a
        ``ResourceWarning``, when it is collected, as asyncio's do)."""
        owned, self._foreign = self._foreign, {}
        owned.clear()
        transports = getattr(self, "_transports", {})
        for transport in list(transports.values()):
            if isinstance(transport, _shardloop.Transport):
                transport._release()

    async def _sendfile_fallback(
        self, transp: Any, file: Any, offset: int, count: int | None
    ) -> int:
        """``loop.sendfile`` on a shardloop transport: the file read in
        blocks (in the default executor) and written, within the
        transport's flow control."""
        if not isinstance(transp, _shardloop.Transport):
            return await super()._sendfile_fallback(transp, file, offset, count)  # type: ignore[misc,no-any-return]
        if offset:
            file.seek(offset)
        block = bytearray(min(count, _SENDFILE_BLOCK) if count else _SENDFILE_BLOCK)
        sent = 0
        writer = _SendfileWriter(transp, self)
        try:
            while True:
                size = min(count - sent, len(block)) if count else len(block)
                if size <= 0:
                    return sent
                view = memoryview(block)[:size]
                read = await self.run_in_executor(None, file.readinto, view)
                if not read:
                    return sent
                await writer.drain()
                transp.write(view[:read])
                sent += read
        finally:
            if sent > 0 and hasattr(file, "seek"):
                file.seek(offset + sent)
            writer.restore()

    def _make_socket_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[None] | None = None,
        *,
        extra: dict[str, Any] | None = None,
        server: asyncio.Server | None = None,
    ) -> Any:
        """The transport of a connected stream socket: shardloop's, whose
        reads, writes and delivery to the protocol happen in Rust (see
        ``_shardloop.Transport``), for TCP and Unix sockets; asyncio's
        otherwise. It starts as asyncio's does: ``connection_made``, then
        reading, then ``waiter``, each with ``call_soon``."""
        if sock.type != socket.SOCK_STREAM or sock.family not in _NATIVE_FAMILIES:
            return super()._make_socket_transport(  # type: ignore[misc]
                sock, protocol, waiter, extra=extra, server=server
            )
        asyncio.base_events._set_nodelay(sock)  # type: ignore[attr-defined]
        transport = _shardloop.Transport.make(
            self, sock, protocol, _transport_extra(sock, extra), server, _SERVER_TRACKS_TRANSPORTS
        )
        if server is not None:
            if _SERVER_TRACKS_TRANSPORTS:
                server._attach(transport)  # type: ignore[attr-defined]
            else:
                server._attach()  # type: ignore[attr-defined]
        self._transports[sock.fileno()] = transport  # type: ignore[attr-defined]
        self.call_soon(protocol.connection_made, transport)
        self.call_soon(transport._start_reading)
        if waiter is not None:
            self.call_soon(asyncio.futures._set_result_unless_cancelled, waiter, None)  # type: ignore[attr-defined]
        return transport


class _SendfileWriter(asyncio.Protocol):
    """Stands in for a shardloop transport's protocol while ``loop.sendfile``
    writes a file through it (asyncio's fallback, as asyncio's own
    stand-in does for its transports): reading is paused, and each block
    waits while the transport's buffer is past its high water mark."""

    def __init__(self, transport: _shardloop.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._protocol = transport.get_protocol()
        self._was_reading = transport.is_reading()
        self._was_paused = transport._protocol_paused
        self._writable: asyncio.Future[None] | None = None
        if self._was_paused:
            self._writable = loop.create_future()
        transport.pause_reading()
        transport.set_protocol(self)

    async def drain(self) -> None:
        if self._transport.is_closing():
            raise ConnectionError("Connection closed by peer")
        if self._writable is not None:
            await self._writable

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None:
            self._writable.set_result(None)
            self._writable = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._writable is not None:
            self._writable.set_exception(exc or ConnectionError("Connection is closed by peer"))
        self._protocol.connection_lost(exc)

    def restore(self) -> None:
        """Gives the transport back to its protocol, as it was."""
        transport = self._transport
        transport.set_protocol(self._protocol)
        if self._was_reading:
            transport.resume_reading()
        if self._writable is not None:
            self._writable.cancel()
        # The protocol hears how the transport's flow control changed while
        # it was stood in for, and nothing else.
        paused = transport._protocol_paused
        if paused and not self._was_paused:
            self._protocol.pause_writing()
        elif self._was_paused and not paused:
            self._protocol.resume_writing()


# How much loop.sendfile reads and writes at a time on a shardloop transport.
_SENDFILE_BLOCK = 64 * 1024

# The socket families whose connections get shardloop's transport.
_NATIVE_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)

# asyncio's Server counts its connections through _attach()/_detach(), and
# from 3.13 on keeps them too (_attach(transport), for close_clients()).
_SERVER_TRACKS_TRANSPORTS = (
    "transport"
    in inspect.signature(
        asyncio.base_events.Server._attach  # type: ignore[attr-defined]
    ).parameters
)


def _transport_extra(sock: socket.socket, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What a socket transport's get_extra_info() knows, as asyncio's has it."""
    info = dict(extra or {})
    info["socket"] = asyncio.trsock.TransportSocket(sock)  # type: ignore[attr-defined]
    try:
        info["sockname"] = sock.getsockname()
    except OSError:
        info["sockname"] = None
    if "peername" not in info:
        try:
            info["peername"] = sock.getpeername()
        except OSError:
            info["peername"] = None
    return info


if "debug" in inspect.signature(format_helpers._format_callback_source).parameters:

    def _callback_source(callback: Any, args: Any, debug: bool) -> str:
        return format_helpers._format_callback_source(callback, args, debug=debug)  # type: ignore[call-arg]

else:  # Python 3.11

    def _callback_source(callback: Any, args: Any, debug: bool) -> str:
        return format_helpers._format_callback_source(callback, args)


class _CtrlCStops:
    """While shard 0 shuts its runtime down: Ctrl-C stops every shard at
    once (no more waiting for calls) and is raised as KeyboardInterrupt
    when the shutdown is over, instead of interrupting it half way. Only on
    the main thread, and only if SIGINT has Python's default handler."""

    def __init__(self, runtime: _shardloop.Runtime) -> None:
        self._runtime = runtime
        self._pressed = False
        self._outer: _CtrlCStops | None = None
        self._previous: Any = None

    @property
    def pressed(self) -> bool:
        """Whether Ctrl-C came while this guard (or the one around it) was
        in place."""
        return self._pressed or (self._outer is not None and self._outer.pressed)

    def _handler(self, signum: int, frame: Any) -> None:
        self._pressed = True
        try:
            self._runtime.force_stop()
        except RuntimeError:
            pass  # already shut down: nothing left to stop

    def __enter__(self) -> _CtrlCStops:
        if threading.current_thread() is not threading.main_thread():
            return self
        current = signal.getsignal(signal.SIGINT)
        outer = getattr(current, "__self__", None)
        if isinstance(outer, _CtrlCStops):
            self._outer = outer  # run() guards the whole close
        elif current is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _RuntimeState:
    """What the shard loops of one runtime share: shard 0's loop, the
    exception that stopped the runtime, the shutdown grace period, and the
    stall watchdog."""

    def __init__(self, shutdown_timeout: float = 5.0) -> None:
        self.shard0: ShardLoop | None = None
        self.fatal: BaseException | None = None
        self.shutdown_timeout = shutdown_timeout
        self.watchdog: _shardloop.Watchdog | None = None
        # When the grace period of the shutdown ends (on shard 0's clock),
        # once run() has started it.
        self.grace_ends: float | None = None

    def report_fatal(self, exc: BaseException) -> None:
        """From any shard: ``exc`` stops the whole runtime."""
        shard0 = self.shard0
        if self.fatal is None:
            self.fatal = exc
        if shard0 is not None and not shard0.is_closed():
            try:
                shard0.call_soon_threadsafe(shard0._fatal, exc)
            except RuntimeError:  # shard 0's loop closed meanwhile
                pass


# An idle shard polls at most this long (seconds) before it sleeps.
_MAX_IDLE_POLL = 60.0

# How often a draining shard 0 looks whether calls are still in flight, and
# how long it waits for cancelled calls to end.
_QUIET_POLL = 0.001
_CANCEL_WAIT = 1.0


_open_runtimes: weakref.WeakSet[ShardLoop] = weakref.WeakSet()

# At exit, how long (seconds) the interpreter waits for shards still running
# Python code before it finalizes (free-threaded), or between its notices
# that it still waits (with the GIL, where it waits as long as they run).
_EXIT_WAIT = 10.0


@atexit.register
def _close_open_runtimes() -> None:
    """At interpreter exit: shuts down runtimes whose loops were never
    closed, then keeps the shards of runtimes still running (in daemon
    threads) out of Python while the interpreter finalizes (they stop where
    they are, as daemon threads do)."""
    try:
        for loop in list(_open_runtimes):
            if loop._thread == threading.get_ident() and not loop.is_closed():
                if not loop.is_running():
                    loop.close()
    finally:
        _shardloop.prepare_exit(_EXIT_WAIT)


def _serve_shard(state: _RuntimeState, driver: _shardloop.Driver) -> None:
    """The main function of shards 1..N: run a ShardLoop until shutdown.

    ``SystemExit`` or ``KeyboardInterrupt`` raised by user code on this
    shard stops the whole runtime (shard 0 re-raises it from ``run()``);
    this loop keeps serving until the runtime stops."""
    threading.current_thread().name = f"shard-{driver.shard_id}"
    loop = ShardLoop(driver, state=state)
    asyncio.set_event_loop(loop)
    try:
        while True:
            try:
                loop.run_until_complete(loop._until_stopped())
                break
            except (SystemExit, KeyboardInterrupt) as exc:
                state.report_fatal(exc)
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        _cancel_remaining(loop)
        loop.close()
        asyncio.set_event_loop(None)


def _run_to_end(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Runs the runtime's own coroutine on ``loop`` as a plain task: not
    through the user's task factory (an eager one would start it before the
    loop runs)."""
    task = asyncio.Task(coro, loop=loop)
    try:
        return loop.run_until_complete(task)
    except RuntimeError:
        if task.done():
            raise
        # A stop left over from an interrupted run_until_complete (Ctrl-C
        # landing after main() finished) ended this run early: run again.
        return loop.run_until_complete(task)


async def _within(coro: Coroutine[Any, Any, T], limit: float) -> T | None:
    """What ``coro`` returns if it does within ``limit`` s; else (or if it
    fails: a shard too busy to answer) None. (Not ``asyncio.wait_for``: the
    runtime's own waits must not depend on ``asyncio.current_task``, which
    code may replace.)"""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=limit)
    if not done:
        task.cancel()
        return None
    return None if task.cancelled() or task.exception() is not None else task.result()


def _quietly(task: asyncio.Task[Any]) -> None:
    """Retrieves the outcome of a task whose outcome does not matter."""
    if not task.cancelled():
        task.exception()


def _cancel_background() -> None:
    """Cancels the tasks of the current shard that serve no call from
    another shard (servers, tasks spawned and left running), once: not the
    task that calls it, nor one cancelled already (shutdown asks more than
    once, and a second cancel would interrupt the first one's clean-up)."""
    serving = set(_shardloop.call_tasks())
    me = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task not in serving and task is not me and not task.cancelling():
            task.cancel()


def _cancel_tasks() -> list[str]:
    """Cancels every task of the current shard's loop; returns their names
    (with the coroutine each runs)."""
    tasks = [t for t in asyncio.all_tasks() if not t.done()]
    for task in tasks:
        task.cancel()
    return [f"{t.get_name()} ({_describe(t)})" for t in tasks]


def _describe(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or repr(coro)


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    """Cancels the tasks left on ``loop`` and lets them end, waiting at most
    a second for those that do not take the hint."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        _run_to_end(loop, asyncio.wait(tasks, timeout=_CANCEL_WAIT))
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                loop.call_exception_handler(
                    {
                        "message": "unhandled exception in a task cancelled at shutdown",
                        "exception": task.exception(),
                        "task": task,
                    }
                )


def _shard_count(shards: int | None) -> int | None:
    """The number of shards asked for (None: one per CPU of the cpuset);
    ValueError for one that is not a positive integer, saying where it came
    from."""
    what = "shards"
    if shards is None:
        env = os.environ.get("SHARDLOOP_SHARDS")
        if not env:
            return None
        what = "SHARDLOOP_SHARDS"
        try:
            shards = int(env)
        except ValueError:
            raise ValueError(f"SHARDLOOP_SHARDS must be an integer, not {env!r}") from None
    if isinstance(shards, bool) or not isinstance(shards, int):
        raise TypeError(f"shards must be an int, not {type(shards).__name__}")
    if shards < 1:
        raise ValueError(f"{what} must be at least 1, not {shards}")
    return shards


def _cpuset(cpuset: str | Iterable[int] | None) -> list[int] | None:
    """The CPUs asked for (None: every CPU the process may use), from
    ``cpuset`` or else ``SHARDLOOP_CPUSET``: a list such as ``[0, 1, 2]`` or
    a string such as ``"0-3,8"`` (Seastar's ``--cpuset``, the kernel's CPU
    lists). TypeError or ValueError for one that is not, saying where it
    came from; whether the process may use them the runtime checks."""
    what = "cpuset"
    if cpuset is None:
        cpuset = os.environ.get("SHARDLOOP_CPUSET") or None
        if cpuset is None:
            return None
        what = "SHARDLOOP_CPUSET"
    if isinstance(cpuset, str):
        return _parse_cpu_list(cpuset, what)
    try:
        cpus = list(cpuset)
    except TypeError:
        raise TypeError(
            f"cpuset must be a list of CPU numbers or a string such as '0-3,8', "
            f"not {type(cpuset).__name__}"
        ) from None
    for cpu in cpus:
        if isinstance(cpu, bool) or not isinstance(cpu, int):
            raise TypeError(f"cpuset must hold CPU numbers (int), not {type(cpu).__name__}")
        _check_cpu(cpu, what)
    return cpus


# Linux's cpu_set_t holds CPUs 0 to 1023.
_CPU_SETSIZE = 1024


def _check_cpu(cpu: int, what: str) -> None:
    if not 0 <= cpu < _CPU_SETSIZE:
        raise ValueError(f"{what} must hold CPU numbers from 0 to {_CPU_SETSIZE - 1}, not {cpu}")


def _parse_cpu_list(text: str, what: str) -> list[int]:
    """``"0-3,8"`` as ``[0, 1, 2, 3, 8]``; ValueError naming ``what``."""
    cpus: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ValueError(f"{what} must be a CPU list such as '0-3,8', not {text!r}") from None
        if high < low:
            raise ValueError(f"{what} has an empty range {part.strip()!r}: {text!r}")
        _check_cpu(low, what)
        _check_cpu(high, what)
        cpus.extend(range(low, high + 1))
    return cpus


def new_event_loop(
    shards: int | None = None,
    *,
    pin: bool = True,
    idle_poll: float = 200e-6,
    overprovisioned: bool | None = None,
    shutdown_timeout: float = 5.0,
    stall_threshold: float | None = 0.025,
    cpuset: str | Iterable[int] | None = None,
) -> ShardLoop:
    """Starts a runtime and returns shard 0's loop, for the calling thread.

    ``shards`` defaults to ``SHARDLOOP_SHARDS`` or one per CPU of the
    cpuset. ``cpuset`` (default ``SHARDLOOP_CPUSET``, else every CPU the
    process may use) names the CPUs the shards run on, as a list or a string
    such as ``"0-3,8"``: pinned, shard ``i`` runs on its ``i``-th CPU;
    otherwise every shard may run on any of them. A CPU the process may not
    use, one named twice, or fewer CPUs than shards (unless overprovisioned)
    is a ValueError. ``idle_poll`` is how long (seconds) an idle shard keeps
    polling before it sleeps. ``overprovisioned`` (default:
    ``SHARDLOOP_OVERPROVISIONED=1``) says the shards share their cores with
    other busy threads, such as a load generator on the same machine: shards
    are then not pinned, and they yield their core while they poll or wait
    for the GIL instead of spinning. Closing the loop shuts the runtime
    down, giving calls still in flight ``shutdown_timeout`` seconds to
    finish before they are cancelled. A shard that runs Python for
    ``stall_threshold`` seconds (None: never reported) without returning to
    its loop is reported through ``logging`` (see ``shardloop.run``).
    Use it with
    ``asyncio.run(main(), loop_factory=shardloop.new_event_loop)``.
    """
    if overprovisioned is None:
        overprovisioned = os.environ.get("SHARDLOOP_OVERPROVISIONED", "") not in ("", "0")
    for name, seconds in (("shutdown_timeout", shutdown_timeout), ("idle_poll", idle_poll)):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"{name} must be a number of seconds, not {type(seconds).__name__}")
    if stall_threshold is not None:
        if isinstance(stall_threshold, bool) or not isinstance(stall_threshold, (int, float)):
            raise TypeError(
                "stall_threshold must be a number of seconds or None, "
                f"not {type(stall_threshold).__name__}"
            )
        if not 0 < stall_threshold <= 3600:  # (NaN too)
            raise ValueError(
                f"stall_threshold must be above 0 and at most 3600 seconds, not {stall_threshold!r}"
            )
    if not 0 <= shutdown_timeout:  # (NaN too)
        raise ValueError(f"shutdown_timeout must be at least 0, not {shutdown_timeout!r}")
    if not 0 <= idle_poll <= _MAX_IDLE_POLL:
        raise ValueError(
            f"idle_poll must be between 0 and {_MAX_IDLE_POLL:g} seconds, not {idle_poll!r}"
        )
    if threading.current_thread() is not threading.main_thread() and pin:
        # Pinning shard 0 pins the calling thread; that is only expected of
        # the main thread.
        pin = False
    cpus = _cpuset(cpuset)
    state = _RuntimeState(shutdown_timeout)
    runtime = _shardloop.Runtime(
        functools.partial(_serve_shard, state),
        shards=_shard_count(shards),
        cpuset=cpus,
        pin=pin,
        idle_poll=idle_poll,
        overprovisioned=overprovisioned,
        stall_threshold=stall_threshold,
    )
    driver = None
    try:
        driver = runtime.driver()
        if stall_threshold is not None:
            state.watchdog = _shardloop.Watchdog(driver, stall_threshold, _stall.report)
        return ShardLoop(driver, runtime, state)
    except BaseException:
        # Interrupted while starting (Ctrl-C): nothing is left running.
        if state.watchdog is not None:
            state.watchdog.stop()
        runtime.force_stop()
        if driver is not None:
            driver.close()
        runtime.shutdown()
        raise


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
    raise RuntimeError(_shardloop.NOT_ON_SHARD)
