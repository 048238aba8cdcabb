"""Metrics for operators: every counter of ``shardloop.stats()`` as
Prometheus metrics, and an HTTP endpoint on shard 0 that serves them.

Needs ``prometheus_client`` (``pip install shardloop[metrics]``)::

    from shardloop import metrics

    async def main():
        server = await metrics.serve_metrics(9100)   # GET /metrics on shard 0
        ...

Or, to add the runtime's metrics to a registry of your own (for
prometheus_client's own exporters)::

    prometheus_client.REGISTRY.register(metrics.Collector())

Every metric is named ``shardloop_<stats key>`` with the labels that
locate it: ``shard`` for a shard's loop, ``from`` and ``to`` for the queue
between two shards, and ``group`` too for a service group's calls on one.
Counts that only grow are counters (``_total``); what is true now (a
queue's depth, the calls in flight, the calls waiting) and the highest
values seen are gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

try:
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        Metric,
    )
    from prometheus_client.registry import REGISTRY
    from prometheus_client.registry import Collector as _Collector
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "shardloop.metrics needs prometheus_client: pip install 'shardloop[metrics]'"
    ) from exc

from . import _shardloop, shard
from ._loop import current_loop

logger = logging.getLogger("shardloop")

__all__ = ["METRICS", "Collector", "MetricsServer", "serve_metrics"]


class _Metric(NamedTuple):
    """One ``stats()`` entry exported: its section and key, whether it is a
    counter, and what it means."""

    section: str
    key: str
    counter: bool
    help: str


# Every counter of stats(), by section; the labels of a section are its
# other keys (see _LABELS). A test checks that each key of stats() is here.
METRICS: tuple[_Metric, ...] = (
    _Metric("queues", "sent", True, "Requests handed to the queue by the sending shard."),
    _Metric("queues", "received", True, "Requests taken off the queue by the receiving shard."),
    _Metric("queues", "completed", True, "Completions returned to the sending shard."),
    _Metric("queues", "batches", True, "Batches published on the request ring."),
    _Metric("queues", "depth", False, "Requests sent and not yet taken off the queue."),
    _Metric("queues", "in_flight", False, "Requests sent whose completion has not come back."),
    _Metric("queues", "max_depth", False, "The most requests found waiting in the ring at once."),
    _Metric(
        "queues", "max_pending", False, "The most requests held in the sender's overflow at once."
    ),
    _Metric("shards", "polls", True, "Turns of the shard's poll loop."),
    _Metric("shards", "tasks_run", True, "Calls and answers the shard handled."),
    _Metric("shards", "sleeps", True, "Times the shard slept for want of work."),
    _Metric("shards", "wakeups", True, "Wake-ups this shard sent to sleeping peers."),
    _Metric(
        "shards", "preempted", True, "Times the shard's thread lost its core while it could run."
    ),
    _Metric("shards", "stalls", True, "Times the shard ran Python past the stall threshold."),
    _Metric("shards", "worst_stall_seconds", False, "The longest stall of the shard, in seconds."),
    _Metric("groups", "max_inflight", False, "The group's bound of calls in flight per pair."),
    _Metric("groups", "in_flight", False, "The group's calls in flight on the pair."),
    _Metric("groups", "waiting", False, "The group's calls waiting on the sender, unsent."),
    _Metric("groups", "sent", True, "The group's calls sent on the pair."),
    _Metric("groups", "waited", True, "The group's calls that waited before they were sent."),
    _Metric("groups", "wait_seconds", True, "Seconds the group's calls spent waiting, in all."),
    _Metric("groups", "max_wait_seconds", False, "The longest wait of one of the group's calls."),
)

# The keys of each stats() section that say where a value was counted.
_LABELS: dict[str, tuple[str, ...]] = {
    "queues": ("from", "to"),
    "shards": ("shard",),
    "groups": ("group", "from", "to"),
}

# The metric name of a section's entry: queue and group counters say what
# they count (shardloop_queue_sent_total), a shard's need no prefix.
_PREFIX = {"queues": "shardloop_queue_", "shards": "shardloop_", "groups": "shardloop_group_"}


def _family(metric: _Metric) -> CounterMetricFamily | GaugeMetricFamily:
    name = _PREFIX[metric.section] + metric.key
    labels = list(_LABELS[metric.section])
    if metric.counter:
        return CounterMetricFamily(name, metric.help, labels=labels)
    return GaugeMetricFamily(name, metric.help, labels=labels)


class Collector(_Collector):
    """A ``prometheus_client`` collector of one runtime's ``stats()``.

    ``Collector()`` on a shard reads that shard's runtime; ``Collector(rt)``
    reads the runtime of a :class:`shardloop.Runtime` started with
    ``shardloop.start``. It reads the counters from any thread (the one an
    exporter scrapes on) without waiting for a shard; once its runtime has
    stopped, it reports their last values.
    """

    def __init__(self, runtime: Any = None) -> None:
        reader: _shardloop.StatsReader
        if runtime is None:
            reader = current_loop()._driver.stats_reader()
        elif isinstance(getattr(runtime, "stats_reader", None), _shardloop.StatsReader):
            reader = runtime.stats_reader
        else:
            raise TypeError(
                "Collector() takes a shardloop.Runtime (from shardloop.start), or nothing "
                f"on a shard, not {type(runtime).__name__}"
            )
        self._read: Callable[[], dict[str, Any]] = reader.read

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        for metric in METRICS:
            family = _family(metric)
            labels = _LABELS[metric.section]
            for entry in stats[metric.section]:
                family.add_metric([str(entry[label]) for label in labels], entry[metric.key])
            yield family

    def describe(self) -> Iterable[Metric]:
        # Registering checks the names against the registry's without
        # reading the counters.
        return [_family(metric) for metric in METRICS]


class _Exposed(_Collector):
    """What an endpoint exposes: the runtime's collector and, after it, a
    registry's metrics (the process's and the application's own)."""

    def __init__(self, collector: Collector, registry: Any) -> None:
        self._collector = collector
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._collector.collect()
        if self._registry is not None:
            yield from self._registry.collect()


# A request line and headers larger than this are refused (431).
_MAX_REQUEST = 16 * 1024
# A client that has not sent its whole request by then is dropped.
_REQUEST_TIMEOUT = 10.0


class MetricsServer:
    """The endpoint :func:`serve_metrics` started on shard 0: ``GET
    /metrics`` (or ``/``) answers with the metrics in Prometheus's text
    format, or OpenMetrics when the scraper asks for it. Close it with
    ``await server.close()`` (from any shard), or ``async with``."""

    def __init__(self, server: asyncio.Server) -> None:
        self._server = server
        self.host, self.port = server.sockets[0].getsockname()[:2]
        # A task of shard 0 serves it: when the runtime stops, shard 0's
        # tasks are cancelled, and serve_forever closes the server then.
        self._serving = asyncio.ensure_future(server.serve_forever())

    @property
    def url(self) -> str:
        """Where to scrape, e.g. ``http://127.0.0.1:9100/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def close(self) -> None:
        """Stops listening and waits until the server is closed (on Python
        3.13 and later, open connections are closed too; before, a scrape
        in progress is waited for)."""
        await shard.submit_to(0, self._close_here)

    async def _close_here(self) -> None:
        self._serving.cancel()
        self._server.close()
        with contextlib.suppress(AttributeError):  # (Python 3.13+)
            self._server.close_clients()  # type: ignore[attr-defined]
        await self._server.wait_closed()

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url}>"


async def serve_metrics(
    port: int = 0, host: str = "127.0.0.1", *, registry: Any = REGISTRY
) -> MetricsServer:
    """Serves the runtime's metrics over HTTP from shard 0 (whichever shard
    calls it) on ``host``:``port`` (0: a free port; see ``.port``), for a
    Prometheus scraper. Each scrape also exposes ``registry``'s metrics
    (default: prometheus_client's, where the process's and the
    application's own metrics are; None: the runtime's alone), so a
    :class:`Collector` of this runtime must not be registered there too
    (its series would appear twice). ``host`` is loopback by default:
    ``"0.0.0.0"`` for a scraper on another machine. The server
    closes when ``close()`` is awaited or the runtime stops."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, not {port}")
    current_loop()  # a clear error off a shard
    server: MetricsServer = await shard.submit_to(0, _start, port, host, registry)
    return server


async def _start(port: int, host: str, registry: Any) -> MetricsServer:
    exposed = _Exposed(Collector(), registry)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, headers, body = await asyncio.wait_for(
                _respond(reader, exposed), _REQUEST_TIMEOUT
            )
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            return
        except Exception:
            # A collector of the registry failed: say so, and keep serving.
            logger.exception("shardloop.metrics: collecting the metrics failed")
            status, headers, body = "500 Internal Server Error", [], b"collecting failed\n"
        head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close"]
        head += [f"{name}: {value}" for name, value in headers]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, host, port, limit=_MAX_REQUEST)
    return MetricsServer(server)


async def _respond(
    reader: asyncio.StreamReader, exposed: _Exposed
) -> tuple[str, list[tuple[str, str]], bytes]:
    """The status, headers and body that answer the request ``reader``
    brings."""
    try:
        request = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        return "431 Request Header Fields Too Large", [], b"request too large\n"
    lines = request.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "400 Bad Request", [], b"bad request line\n"
    method, target, _ = parts
    if method != "GET":
        return "405 Method Not Allowed", [("Allow", "GET")], b"GET only\n"
    if target.split("?", 1)[0] not in ("/metrics", "/"):
        return "404 Not Found", [], b"the metrics are at /metrics\n"
    accept = next(
        (line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("accept:")),
        "",
    )
    encoder, content_type = choose_encoder(accept)
    body = encoder(exposed)
    return "200 OK", [("Content-Type", content_type)], body
