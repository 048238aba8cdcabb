"""shardloop.metrics: the runtime's counters as Prometheus metrics, and the
endpoint on shard 0 that serves them."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import warnings

import prometheus_client
import pytest
import shardloop
from conftest import run2
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from shardloop import metrics, shard


async def fetch(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Sends ``request`` to the endpoint and returns the status line, the
    headers and the body of its answer (which ends the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert int(headers["content-length"]) == len(body)
    return status, headers, body


def get(path: str = "/metrics", accept: str | None = None) -> bytes:
    extra = f"Accept: {accept}\r\n" if accept else ""
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the text format, parsed by prometheus_client's own
    parser, by name and labels; also checks each family's type."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        TYPES[family.name] = family.type
    return found


TYPES: dict[str, str] = {}


@pytest.mark.shardloop(shards=2)
async def test_a_scrape_over_http_has_every_counter_with_its_labels_and_type() -> None:
    await asyncio.gather(*(shard.submit_to(1, abs, -i) for i in range(50)))
    async with await metrics.serve_metrics() as server:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        # Scraped from shard 1: the endpoint answers on shard 0.
        status, headers, body = await shard.submit_to(1, fetch, server.port, get())
    text, stats = body.decode(), shardloop.stats()
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(text)
    # The 50 calls, and the scrape's own call to shard 1, in flight then.
    assert found[("shardloop_queue_sent_total", (("from", "0"), ("to", "1")))] == 51
    assert found[("shardloop_queue_completed_total", (("from", "0"), ("to", "1")))] == 50
    assert found[("shardloop_queue_in_flight", (("from", "0"), ("to", "1")))] == 1
    key = ("shardloop_group_sent_total", (("from", "0"), ("group", "default"), ("to", "1")))
    assert found[key] == 51
    assert found[("shardloop_stalls_total", (("shard", "1"),))] == 0
    assert TYPES["shardloop_queue_sent"] == "counter"
    assert TYPES["shardloop_polls"] == "counter"
    for gauge in ("queue_depth", "queue_in_flight", "group_in_flight", "group_waiting"):
        assert TYPES[f"shardloop_{gauge}"] == "gauge", gauge
    # Every key of stats() is exported, for every entry of its section.
    for section, labels in (
        ("queues", ("from", "to")),
        ("shards", ("shard",)),
        ("groups", ("group", "from", "to")),
    ):
        exported = {m.key for m in metrics.METRICS if m.section == section}
        assert exported == set(stats[section][0]) - set(labels), section
        for metric in metrics.METRICS:
            if metric.section != section:
                continue
            prefix = {"queues": "queue_", "shards": "", "groups": "group_"}[section]
            name = f"shardloop_{prefix}{metric.key}" + ("_total" if metric.counter else "")
            for entry in stats[section]:
                where = tuple(sorted((label, str(entry[label])) for label in labels))
                assert (name, where) in found, (name, where)


@pytest.mark.shardloop(shards=2)
async def test_the_gauges_show_calls_in_flight_and_waiting_now() -> None:
    """With a group of 2 and 5 calls held on shard 1: 2 in flight, 3
    waiting on the sender, and the queue's in-flight gauge says 2."""
    release = shardloop.Sharded(asyncio.Event)
    await release.start()
    group = shardloop.ServiceGroup(max_inflight=2, name="held")

    async def held() -> None:
        await release.local().wait()

    calls = [group.submit_to(1, held) for _ in range(5)]
    await asyncio.sleep(0.05)
    async with await metrics.serve_metrics() as server:
        _, _, body = await shard.submit_to(1, fetch, server.port, get())
    await release.invoke_on_all(lambda e: e.set())
    await asyncio.gather(*calls)
    await release.stop()
    found = samples(body.decode())
    where = (("from", "0"), ("group", "held"), ("to", "1"))
    assert found[("shardloop_group_in_flight", where)] == 2
    assert found[("shardloop_group_waiting", where)] == 3
    assert found[("shardloop_group_max_inflight", where)] == 2
    assert found[("shardloop_queue_in_flight", (("from", "0"), ("to", "1")))] >= 2


@pytest.mark.shardloop(shards=2)
async def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    async with await metrics.serve_metrics(registry=None) as server:
        accept = "application/openmetrics-text; version=1.0.0"
        _, headers, body = await shard.submit_to(1, fetch, server.port, get("/", accept))
    assert headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(body.decode())}
    assert families["shardloop_queue_sent"].type == "counter"
    assert families["shardloop_queue_depth"].type == "gauge"
    # registry=None: the runtime's metrics alone, not the process's.
    assert not any(name.startswith("process_") for name in families)


@pytest.mark.shardloop(shards=2)
async def test_bad_requests_get_http_errors_and_the_server_keeps_serving() -> None:
    statuses = []
    async with await metrics.serve_metrics() as server:
        for request in (
            get("/other"),
            b"POST /metrics HTTP/1.1\r\n\r\n",
            b"nonsense\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 20000 + b"\r\n\r\n",
            get(),
        ):
            status, _, _ = await shard.submit_to(1, fetch, server.port, request)
            statuses.append(status.split(" ", 2)[1])
    assert statuses == ["404", "405", "400", "431", "200"]


@pytest.mark.shardloop(shards=2)
async def test_a_closed_server_refuses_scrapes() -> None:
    # Started and closed from shard 1: both happen on shard 0.
    async def start_and_close() -> int:
        server = await metrics.serve_metrics()
        await server.close()
        return server.port

    port = await shard.submit_to(1, start_and_close)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


def test_bad_arguments_are_clear_errors() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="port must be between 0 and 65535"):
            await metrics.serve_metrics(70000)
        with pytest.raises(TypeError, match="port must be an int"):
            await metrics.serve_metrics("9100")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"Collector\(\) takes a shardloop\.Runtime"):
            metrics.Collector(object())

    run2(main())
    with pytest.raises(RuntimeError, match="shard"):
        asyncio.run(metrics.serve_metrics())
    with pytest.raises(RuntimeError, match="shard"):
        metrics.Collector()


def test_a_collector_of_a_background_runtime_reads_from_any_thread(
    shardloop_runtime: shardloop.Runtime,
) -> None:
    rt = shardloop_runtime
    registry = prometheus_client.CollectorRegistry()
    registry.register(metrics.Collector(rt))
    rt.submit_to(1, abs, -1).result(10)
    rt.submit_to(1, time.sleep, 0.1).result(10)  # a stall (threshold 25 ms)
    found = samples(prometheus_client.generate_latest(registry).decode())
    assert found[("shardloop_queue_completed_total", (("from", "0"), ("to", "1")))] >= 2
    assert found[("shardloop_stalls_total", (("shard", "1"),))] == 1
    # After close, the collector still reads the last values; the stall
    # counts too (they read 0 once the shards had gone).
    rt.close()
    found = samples(prometheus_client.generate_latest(registry).decode())
    assert found[("shardloop_stalls_total", (("shard", "1"),))] == 1
    assert found[("shardloop_queue_completed_total", (("from", "0"), ("to", "1")))] >= 2
    assert rt.stats()["shards"][1]["stalls"] == 1


def test_a_server_left_open_closes_with_the_runtime() -> None:
    """Fault: a server never closed kept its listening socket past the
    runtime, until a ResourceWarning at garbage collection. Expected: it
    closes when the runtime stops."""

    async def main() -> int:
        return (await metrics.serve_metrics()).port

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        port = run2(main())
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], caught
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
