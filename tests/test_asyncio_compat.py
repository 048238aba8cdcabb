"""The standard library on a shard loop, checked against stock asyncio."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

Run = Callable[[Coroutine[Any, Any, Any]], Any]


def test_running_loop_and_call_ordering(run_on: Run) -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        order: list[str] = []
        loop.call_later(0.02, order.append, "later")
        loop.call_soon(order.append, "soon")
        await asyncio.sleep(0.05)
        return order

    assert run_on(main()) == ["soon", "later"]


def test_sleep_gather_and_wait_for(run_on: Run) -> None:
    async def value(x: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return x

    async def main() -> tuple[list[int], bool]:
        results = await asyncio.gather(value(1, 0.02), value(2, 0.01), value(3, 0))
        try:
            await asyncio.wait_for(value(4, 5), timeout=0.02)
        except TimeoutError:
            timed_out = True
        else:
            timed_out = False
        return list(results), timed_out

    assert run_on(main()) == ([1, 2, 3], True)


def test_timeout_and_task_group(run_on: Run) -> None:
    async def main() -> tuple[bool, list[int]]:
        try:
            async with asyncio.timeout(0.02):
                await asyncio.sleep(5)
        except TimeoutError:
            expired = True
        else:
            expired = False
        out: list[int] = []

        async def add(i: int) -> None:
            await asyncio.sleep(0.001 * i)
            out.append(i)

        async with asyncio.TaskGroup() as group:
            for i in range(5):
                group.create_task(add(i))
        return expired, out

    assert run_on(main()) == (True, [0, 1, 2, 3, 4])


def test_locks_events_and_queues(run_on: Run) -> None:
    async def main() -> list[int]:
        queue: asyncio.Queue[int] = asyncio.Queue(maxsize=2)
        lock = asyncio.Lock()
        done = asyncio.Event()
        got: list[int] = []

        async def producer() -> None:
            for i in range(10):
                await queue.put(i)
            done.set()

        async def consumer() -> None:
            while not (done.is_set() and queue.empty()):
                item = await queue.get()
                async with lock:
                    got.append(item)

        await asyncio.gather(producer(), consumer())
        return got

    assert run_on(main()) == list(range(10))


def test_streams_echo_on_loopback(run_on: Run) -> None:
    async def main() -> bytes:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.readline()
            writer.write(data.upper())
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello shard\n" * 1)
            await writer.drain()
            reply = await reader.readline()
            writer.close()
            await writer.wait_closed()
        return reply

    assert run_on(main()) == b"HELLO SHARD\n"


def test_large_stream_transfer(run_on: Run) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: several reads per readiness

    async def main() -> int:
        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.readexactly(len(payload))
            writer.write(len(data).to_bytes(8, "big"))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(8), "big")
            writer.close()
        return size

    assert run_on(main()) == len(payload)


def test_run_in_executor_and_call_soon_threadsafe(run_on: Run) -> None:
    async def main() -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        total = await loop.run_in_executor(None, sum, range(100))
        future: asyncio.Future[str] = loop.create_future()

        def other_thread() -> None:
            loop.call_soon_threadsafe(future.set_result, threading.current_thread().name)

        threading.Thread(target=other_thread, name="helper").start()
        return total, await future

    assert run_on(main()) == (4950, "helper")


def test_cancellation_of_tasks(run_on: Run) -> None:
    async def main() -> bool:
        task = asyncio.create_task(asyncio.sleep(10))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert run_on(main()) is True


def test_exception_in_task_propagates(run_on: Run) -> None:
    async def fail() -> None:
        await asyncio.sleep(0)
        raise LookupError("x")

    async def main() -> None:
        await asyncio.create_task(fail())

    with pytest.raises(LookupError):
        run_on(main())
