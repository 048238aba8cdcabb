"""What remote calls raise: every exception reaches the caller, and
SystemExit or KeyboardInterrupt stop the runtime and come out of run()."""

from __future__ import annotations

import pytest

from ._harness import assert_clean_exit, describe, run_script, scenario


@pytest.mark.parametrize("direction", ["0->1", "1->0"])
def test_remote_coroutine_raising_system_exit_leaves_run_with_it(direction: str) -> None:
    """Fault: a remote coroutine raising SystemExit(3) left run() hanging.
    Expected: run() re-raises it, so the uncaught SystemExit(3) gives exit
    code 3, quickly, as asyncio.run would."""
    body = f"""
    async def bye():
        await asyncio.sleep(0)
        raise SystemExit(3)

    async def call_from(origin, target):
        if shard.id() != origin:
            return await shard.submit_to(origin, call_from, origin, target)
        await shard.submit_to(target, bye)

    async def main():
        origin, target = {direction.split("->")[0]}, {direction.split("->")[1]}
        await call_from(origin, target)
        await asyncio.sleep(30)
        print("run() went on", flush=True)

    run2(main())
    print("run() returned", flush=True)
    """
    proc = run_script(scenario(body), timeout=8)
    assert proc.returncode == 3, describe(proc)
    assert "run() went on" not in proc.stdout and "run() returned" not in proc.stdout
    assert "panicked" not in proc.stderr and "Fatal Python error" not in proc.stderr


@pytest.mark.parametrize("kind", ["plain", "coroutine"])
def test_remote_keyboard_interrupt_propagates_from_run(kind: str) -> None:
    """Fault: a remote call raising KeyboardInterrupt left run() hanging.
    Expected: KeyboardInterrupt propagates from run(), promptly."""
    body = f"""
    def plain():
        raise KeyboardInterrupt

    async def coroutine():
        await asyncio.sleep(0)
        raise KeyboardInterrupt

    async def main():
        await shard.submit_to(1, {kind})
        await asyncio.sleep(30)

    started = time.monotonic()
    try:
        run2(main())
        print("run() returned", flush=True)
    except KeyboardInterrupt:
        print("KeyboardInterrupt after %.2f" % (time.monotonic() - started), flush=True)
    """
    proc = run_script(scenario(body), timeout=8)
    assert_clean_exit(proc)
    assert "KeyboardInterrupt after" in proc.stdout, describe(proc)
    seconds = float(proc.stdout.split("KeyboardInterrupt after")[1].split()[0])
    assert seconds < 3, describe(proc)


@pytest.mark.parametrize("direction", ["0->1", "1->0", "0->0"])
def test_plain_function_raising_stop_iteration(direction: str) -> None:
    """Fault: a plain remote function raising StopIteration killed the
    calling shard's loop ("StopIteration interacts badly with generators",
    run() failed with TypeError). Expected: the caller gets RuntimeError
    (StopIteration wrapped, as asyncio does), and the runtime keeps
    working."""
    origin, target = direction.split("->")
    body = f"""
    def stop():
        raise StopIteration("s")

    async def call():
        try:
            await asyncio.wait_for(shard.submit_to({target}, stop), 5)
        except BaseException as exc:
            return type(exc).__name__
        return "no exception"

    async def main():
        if {origin} == 0:
            got = await call()
        else:
            got = await asyncio.wait_for(shard.submit_to({origin}, call), 6)
        print("caller got", got, flush=True)
        print("still works", await shard.submit_to(1, sum, [1, 2]), flush=True)
        print("still works", await shard.submit_to(0, sum, [3, 4]), flush=True)

    run2(main())
    """
    proc = run_script(scenario(body), timeout=12)
    assert_clean_exit(proc)
    assert "caller got RuntimeError" in proc.stdout, describe(proc)
    assert "still works 3" in proc.stdout and "still works 7" in proc.stdout, describe(proc)


@pytest.mark.parametrize("notes", ['"x"', '("a", "b")', "42"])
@pytest.mark.parametrize("target", [1, 0])
def test_exception_whose_notes_are_not_a_list(notes: str, target: int) -> None:
    """Fault: a remote exception whose __notes__ is not a list (a string, a
    tuple) made run() fail with "TypeError: Cannot add note: __notes__ is not
    a list". Expected: the caller gets the original exception (type and
    message), and the runtime keeps working."""
    body = f"""
    class Odd(ValueError):
        pass

    def fail():
        exc = Odd("odd notes")
        exc.__notes__ = {notes}
        raise exc

    async def main():
        try:
            await asyncio.wait_for(shard.submit_to({target}, fail), 5)
        except BaseException as exc:
            print("caller got", type(exc).__name__, exc, flush=True)
        print("still works", await shard.submit_to(1, sum, [1, 2]), flush=True)

    run2(main())
    """
    proc = run_script(scenario(body), timeout=15)
    assert_clean_exit(proc)
    assert "caller got Odd odd notes" in proc.stdout, describe(proc)
    assert "still works 3" in proc.stdout, describe(proc)


KINDS = """
class Custom(Exception):
    pass

class Fatal(BaseException):
    '''A BaseException subclass that is neither SystemExit nor
    KeyboardInterrupt (nor GeneratorExit).'''

class Unpicklable(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()
        self.gen = (i for i in range(3))

class WithNotes(Exception):
    pass

def with_notes():
    exc = WithNotes("n")
    exc.add_note("first note")
    return exc

KINDS = {
    "ValueError": lambda: ValueError("v"),
    "Custom": lambda: Custom("c"),
    "ExceptionGroup": lambda: ExceptionGroup("g", [ValueError("a"), TypeError("b")]),
    "BaseExceptionGroup": lambda: BaseExceptionGroup("bg", [Fatal("f")]),
    "Unpicklable": lambda: Unpicklable("u"),
    "Fatal": lambda: Fatal("f"),
    "WithNotes": with_notes,
}
"""


@pytest.mark.parametrize(
    "kind",
    [
        "ValueError",
        "Custom",
        "ExceptionGroup",
        "BaseExceptionGroup",
        "Unpicklable",
        "Fatal",
        "WithNotes",
    ],
)
def test_every_kind_of_exception_reaches_the_caller(kind: str) -> None:
    """Fault: exceptions of every kind raised by plain and coroutine calls,
    in both directions. Expected: the caller gets the same exception object
    type, with its own notes kept and "raised on shard N" added, and the
    runtime keeps working."""
    body = f"""
    def plain(kind):
        raise KINDS[kind]()

    async def coroutine(kind):
        await asyncio.sleep(0)
        raise KINDS[kind]()

    async def call(target, fn, kind):
        try:
            await asyncio.wait_for(shard.submit_to(target, fn, kind), 5)
        except BaseException as exc:
            return type(exc).__name__, list(getattr(exc, "__notes__", []))
        return "no exception", []

    async def main():
        for fn in (plain, coroutine):
            print("0->1", fn.__name__, await call(1, fn, {kind!r}), flush=True)
            print("1->0", fn.__name__, await shard.submit_to(1, call, 0, fn, {kind!r}), flush=True)
        print("still works", await shard.submit_to(1, sum, [1, 2]), flush=True)

    run2(main())
    """
    proc = run_script(scenario(KINDS, body), timeout=15)
    assert_clean_exit(proc)
    lines = proc.stdout.splitlines()
    first = ["first note"] if kind == "WithNotes" else []
    for direction in ("0->1", "1->0"):
        note = f"raised on shard {direction[-1]}"
        for fn in ("plain", "coroutine"):
            expected = f"{direction} {fn} {(kind, [*first, note])!r}"
            assert expected in lines, f"expected {expected!r}\n{describe(proc)}"
    assert "still works 3" in lines, describe(proc)
