"""The native half of shardloop (a PyO3 module). Use the ``shardloop``
package; these are its building blocks."""

import asyncio
from collections.abc import Callable, Generator, Iterable
from contextvars import Context
from typing import Any, Generic, TypeVar, final

from typing_extensions import disjoint_base

_T = TypeVar("_T")

__all__ = [
    "DEFAULT_MAX_INFLIGHT",
    "NOT_ON_SHARD",
    "AwaitShard",
    "Connection",
    "Driver",
    "Handle",
    "Runtime",
    "Scheduler",
    "ServiceGroup",
    "ShardFuture",
    "ShutdownError",
    "StatsReader",
    "TimerHandle",
    "Transport",
    "Waiting",
    "Watchdog",
    "call_tasks",
    "check_shard",
    "prepare_exit",
    "relay",
    "sleep",
    "submit_to",
]

class ShutdownError(RuntimeError):
    """The runtime is shutting down: the call was not sent."""

NOT_ON_SHARD: str
"""What a call made off a shard is told."""

DEFAULT_MAX_INFLIGHT: int
"""The default group's bound on the calls in flight from one shard to
another."""

@final
class Watchdog:
    """Watches the shards of a runtime for stalls from a thread of its own."""

    def __new__(
        cls,
        driver: Driver,
        threshold: float,
        report: Callable[[int, float, int, Any, bool], None],
        /,
    ) -> Watchdog: ...
    def stop(self) -> None:
        """Stops the watchdog."""

@disjoint_base
class ServiceGroup:
    """A bound on the calls in flight from each shard to each other shard."""

    def __new__(cls, max_inflight: int, name: str | None = None) -> ServiceGroup: ...
    @property
    def name(self) -> str: ...
    @property
    def max_inflight(self) -> int: ...
    def submit_to(
        self, shard_id: int, func: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> ShardFuture[Any]:
        """``submit_to`` within this group's bound."""

@final
class StatsReader:
    """A runtime's ``stats()``, readable from any thread (a metrics
    exporter's): it holds the counters alone, so it keeps no shard, thread
    or descriptor alive; once the runtime has stopped it reads their last
    values."""

    def read(self) -> dict[str, Any]:
        """The runtime's counters, as ``shardloop.stats()`` returns them."""

@final
class Driver:
    """The shard this thread runs, as seen by its event loop. Only usable on
    the shard's own thread."""

    @property
    def shard_id(self) -> int:
        """This shard's index."""
    @property
    def shard_count(self) -> int:
        """The number of shards."""
    def poll(self, event_loop: asyncio.AbstractEventLoop) -> bool:
        """One turn of the shard's loop without waiting, with the GIL
        released; then runs the calls that arrived and resolves the futures
        of calls that came back. Returns whether the watched descriptors
        signalled new readiness."""
    def wait(self, event_loop: asyncio.AbstractEventLoop, timeout: float | None = None) -> bool:
        """Turns the shard's loop with the GIL released until there is work
        for ``event_loop`` or ``timeout`` seconds pass (None: no limit).
        Plain calls that arrive meanwhile are run here. Returns whether the
        watched descriptors signalled new readiness."""
    def scheduler(
        self,
        event_loop: asyncio.AbstractEventLoop,
        threadsafe: Any,
        own_clock: bool,
        resolution: float,
    ) -> Scheduler:
        """The loop's ready queue, timers and turn, in Rust."""
    def watch_fd(self, fd: int) -> None:
        """Makes ``wait`` return when ``fd`` becomes readable."""
    def may_stop(self) -> bool:
        """Whether shutdown has begun and every shard has finished its calls."""
    def stats(self) -> dict[str, Any]:
        """The runtime's counters as plain dicts."""
    def stats_reader(self) -> StatsReader:
        """The runtime's counters, for reading from any thread."""
    def activate(self, event_loop: asyncio.AbstractEventLoop) -> None:
        """Makes this shard the thread's current one while ``event_loop``
        (its loop) runs."""
    def deactivate(self) -> None:
        """Undoes ``activate`` when the loop stops."""
    def close(self) -> None:
        """Releases the shard from this thread."""

@final
class Runtime:
    """A running set of shards; the thread that builds it is shard 0."""

    def __new__(
        cls,
        worker: Callable[[Driver], object],
        shards: int | None = None,
        pin: bool = True,
        idle_poll: float = 0.0002,
        overprovisioned: bool = False,
        stall_threshold: float | None = None,
        cpuset: list[int] | None = None,
    ) -> Runtime:
        """Starts ``shards`` shards (None: one per CPU of ``cpuset``, by
        default every available one). Shards 1..N run ``worker(driver)`` on
        their own threads."""
    def driver(self) -> Driver:
        """The driver of shard 0, for the calling thread's event loop."""
    def begin_shutdown(self) -> None:
        """Refuses new calls and tells every shard to finish and stop."""
    def force_stop(self) -> None:
        """Stops every shard now, without waiting for the calls in flight."""
    def is_quiet(self) -> bool:
        """Whether no call between shards was in flight a moment ago."""
    def shutdown(self, limit: float | None = None) -> None:
        """Finishes submitted work and joins the shard threads; past
        ``limit`` seconds, or on Ctrl-C, the shards stop at once."""

@final
class Connection:
    """A TCP connection of this shard whose buffers live in Rust."""

    def __new__(cls, fd: int, /) -> Connection: ...
    def read_exactly(self, n: int) -> Waiting[bytes]: ...
    def read_until(self, separator: bytes = b"\n", limit: int = 65536) -> Waiting[bytes]: ...
    def read(self, max: int = 65536) -> Waiting[bytes]: ...
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def drain(self) -> Waiting[None]: ...
    @property
    def pending(self) -> int: ...
    def at_eof(self) -> bool: ...
    @property
    def peername(self) -> tuple[str, int]: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...

@final
class Transport:
    """asyncio's socket transport on a shard loop, with its reads, writes
    and the protocol's delivery in Rust."""

    _start_tls_compatible: bool
    @staticmethod
    def make(
        event_loop: asyncio.AbstractEventLoop,
        sock: Any,
        protocol: asyncio.BaseProtocol,
        extra: dict[str, Any],
        server: asyncio.Server | None,
        detach_with_transport: bool,
        /,
    ) -> Transport: ...
    def _start_reading(self) -> None: ...
    def _call_connection_lost(self, exc: BaseException | None) -> None: ...
    def _release(self) -> None: ...
    @property
    def _sendfile_compatible(self) -> Any: ...
    @property
    def _protocol_paused(self) -> bool: ...
    def get_extra_info(self, name: Any, default: Any = None) -> Any: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None: ...
    def get_protocol(self) -> asyncio.BaseProtocol: ...
    def is_reading(self) -> bool: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def get_write_buffer_limits(self) -> tuple[int, int]: ...
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None: ...
    def write_eof(self) -> None: ...
    def can_write_eof(self) -> bool: ...

@disjoint_base
class Handle:
    """A callback scheduled by a shard loop's ``call_soon``: asyncio's
    ``Handle``, in Rust (not a subclass of it)."""

    def cancel(self) -> None: ...
    def cancelled(self) -> bool: ...
    def get_context(self) -> Context: ...
    def _run(self) -> None: ...
    @property
    def _callback(self) -> Callable[..., object] | None: ...
    @property
    def _args(self) -> tuple[Any, ...] | None: ...
    @property
    def _context(self) -> Context: ...
    @property
    def _cancelled(self) -> bool: ...
    @property
    def _loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def _source_traceback(self) -> Any: ...
    @_source_traceback.setter
    def _source_traceback(self, value: Any) -> None: ...
    @property
    def _repr(self) -> str | None: ...

@final
class TimerHandle(Handle):
    """A callback scheduled by a shard loop's ``call_later`` or ``call_at``."""

    def when(self) -> float: ...
    @property
    def _when(self) -> float: ...
    @property
    def _scheduled(self) -> bool: ...

@final
class Scheduler:
    """A shard loop's ready queue, timers and turn (its ``call_soon``,
    ``call_later``, ``call_at``, ``_add_callback`` and ``_run_once``); made
    by ``Driver.scheduler``."""

    def call_soon(
        self, callback: Callable[..., object], *args: Any, context: Context | None = None
    ) -> Handle: ...
    def call_later(
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: Context | None = None,
    ) -> Any: ...
    def call_at(
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: Context | None = None,
    ) -> TimerHandle: ...
    def add_callback(self, handle: Any) -> None: ...
    def run_once(self) -> None: ...
    def pending(self) -> tuple[int, int]: ...
    def close(self) -> None: ...
    def set_debug(self, enabled: bool) -> None: ...

@final
class ShardFuture(Generic[_T]):
    """The future of a cross-shard call, of a Connection's read or drain, or
    of a Rust task: an asyncio-compatible future of one shard's loop."""

    _asyncio_future_blocking: bool
    def __class_getitem__(cls, item: Any) -> Any: ...
    def __await__(self) -> Generator[Any, None, _T]: ...
    def __iter__(self) -> Generator[Any, None, _T]: ...
    def get_loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def _loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def _cancel_message(self) -> Any: ...
    def _make_cancelled_error(self) -> asyncio.CancelledError: ...
    def done(self) -> bool: ...
    def cancelled(self) -> bool: ...
    def result(self) -> _T: ...
    def exception(self) -> BaseException | None: ...
    def add_done_callback(
        self, fn: Callable[[ShardFuture[_T]], object], *, context: Any = None
    ) -> None: ...
    def remove_done_callback(self, fn: Callable[[ShardFuture[_T]], object], /) -> int: ...
    def cancel(self, msg: Any = None) -> bool: ...

@final
class AwaitShard:
    """What ``await`` iterates on a ShardFuture."""

    def __iter__(self) -> AwaitShard: ...
    def __next__(self) -> Any: ...

@final
class Waiting(Generic[_T]):
    """The awaitable of a read or a drain of a Connection."""

    def __await__(self) -> Generator[Any, None, _T]: ...
    def __next__(self) -> Any: ...

def call_tasks() -> list[asyncio.Task[Any]]:
    """The tasks of this shard that run calls from other shards."""

def prepare_exit(limit: float = 10.0, /) -> None:
    """At interpreter exit: shard threads stop entering Python; waits up to
    ``limit`` seconds for those inside it to leave."""

def sleep(delay: float, /) -> asyncio.Future[None]:
    """Waits ``delay`` seconds on the shard's Rust timers: a Rust future
    awaited from Python."""

def relay(awaitable: Any, /) -> asyncio.Future[Any]:
    """Awaits ``awaitable`` from a Rust task of this shard and resolves the
    returned future with its outcome."""

def check_shard(shard_id: int, count: int, /) -> int:
    """The index ``shard_id`` names among ``count`` shards; the errors of
    ``submit_to`` for one out of range or not an int."""

def submit_to(
    shard_id: int, func: Callable[..., Any], /, *args: Any, **kwargs: Any
) -> ShardFuture[Any]:
    """Runs ``func(*args, **kwargs)`` on shard ``shard_id``; await the result."""
