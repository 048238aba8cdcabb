"""What submit_to sends and gives back: results of every kind, and bad
shard ids."""

from __future__ import annotations

import pytest

from ._harness import assert_clean_exit, describe, run_script, scenario

RESULTS = """
def gen():
    yield 1
    yield 2

def make_generator():
    return gen()

class Awaitable:
    def __await__(self):
        yield from asyncio.sleep(0).__await__()
        return "awaited"

def make_awaitable():
    return Awaitable()

async def agen():
    yield 1

def make_async_generator():
    return agen()

def make_iterator():
    return iter([1, 2])

async def coro():
    await asyncio.sleep(0)
    return ("ran on", shard.id())

def make_coroutine():
    return coro()

def describe(value):
    if isinstance(value, types.GeneratorType):
        return ("generator", list(value))
    if isinstance(value, Awaitable):
        return ("Awaitable", "as is")
    if isinstance(value, types.AsyncGeneratorType):
        return ("async generator", "as is")
    return (type(value).__name__, value if isinstance(value, tuple) else "?")
"""


@pytest.mark.parametrize("target", [1, 0])
@pytest.mark.parametrize(
    ("maker", "expected"),
    [
        ("make_generator", "('generator', [1, 2])"),
        ("make_awaitable", "('Awaitable', 'as is')"),
        ("make_async_generator", "('async generator', 'as is')"),
        ("make_iterator", "('list_iterator', '?')"),
        ("make_coroutine", "('tuple', ('ran on', {target}))"),
    ],
)
def test_plain_function_results_come_back_as_they_are(
    maker: str, expected: str, target: int
) -> None:
    """Fault: a plain function returning a generator failed with "Task got
    bad yield" (on 3.11 asyncio.iscoroutine accepts generators, so the
    generator was run as a task). Expected: what a plain function returns
    comes back as it is (a generator, an object with __await__, an async
    generator, an iterator), except a real coroutine, which runs as a task
    on the target and gives its result."""
    body = f"""
    import types

    async def main():
        try:
            value = await asyncio.wait_for(shard.submit_to({target}, {maker}), 5)
            print("result", describe(value), flush=True)
        except BaseException as exc:
            print("raised", type(exc).__name__, exc, flush=True)

    run2(main())
    """
    proc = run_script(scenario(RESULTS, body), timeout=15)
    assert_clean_exit(proc)
    assert f"result {expected.format(target=target)}" in proc.stdout, describe(proc)


def test_negative_shard_id_is_named_in_the_error() -> None:
    """Fault: shard.submit_to(-1, f) said "shard 0 does not exist".
    Expected: ValueError whose message names -1 and the valid range;
    nothing is sent."""
    body = """
    CALLED = []

    def f():
        CALLED.append(shard.id())

    async def main():
        for bad in (-1, -5, 2, 7):
            try:
                shard.submit_to(bad, f)
                print(bad, "accepted", flush=True)
            except ValueError as exc:
                print(bad, "ValueError", exc, flush=True)
        await shard.submit_to(1, sum, [1])
        print("called", CALLED, flush=True)

    run2(main())
    """
    proc = run_script(scenario(body), timeout=15)
    assert_clean_exit(proc)
    lines = proc.stdout.splitlines()
    for bad in (-1, -5, 2, 7):
        line = next((x for x in lines if x.startswith(f"{bad} ")), "")
        assert line.startswith(f"{bad} ValueError"), describe(proc)
        message = line.split("ValueError", 1)[1]
        assert str(bad) in message, f"the message does not name {bad}: {line}"
        assert "0" in message.replace(str(bad), "") and "1" in message.replace(str(bad), ""), (
            f"the message does not give the valid range: {line}"
        )
    assert "called []" in lines, describe(proc)


@pytest.mark.parametrize("bad", ["2**70", "-2**70", "1.5", '"1"', "None", "[1]"])
def test_shard_id_of_a_wrong_type_or_size(bad: str) -> None:
    """Fault: huge ints (2**70) and non-int shard ids. Expected: a clear
    TypeError or ValueError (not OverflowError), nothing is sent, and the
    runtime still works."""
    body = f"""
    CALLED = []

    def f():
        CALLED.append(shard.id())

    async def main():
        try:
            shard.submit_to({bad}, f)
            print("accepted", flush=True)
        except (TypeError, ValueError) as exc:
            print("clear error", type(exc).__name__, exc, flush=True)
        except BaseException as exc:
            print("other error", type(exc).__name__, exc, flush=True)
        print("still works", await shard.submit_to(1, sum, [1, 2]), flush=True)
        print("called", CALLED, flush=True)

    run2(main())
    """
    proc = run_script(scenario(body), timeout=15)
    assert_clean_exit(proc)
    assert "clear error" in proc.stdout, describe(proc)
    assert "still works 3" in proc.stdout and "called []" in proc.stdout, describe(proc)
