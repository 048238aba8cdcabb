"""ForeignRef: releasing handles on other shards and in other runtimes, and
what is left of them after their runtime."""

from __future__ import annotations

from ._harness import assert_clean_exit, describe, run_script, scenario

# A second runtime on a thread, busy until told to stop, while the main
# thread runs runtimes of its own.
OTHER_RUNTIME = """
class Obj:
    pass

other_started = threading.Event()
other_finish = threading.Event()

async def other_main():
    other_started.set()
    while not other_finish.is_set():
        await asyncio.sleep(0)

other = threading.Thread(target=lambda: run2(other_main()), name="other-runtime")
other.start()
assert other_started.wait(10)

def stop_other():
    other_finish.set()
    other.join(15)
    assert not other.is_alive(), "the other runtime did not stop"
"""


def test_release_of_a_handle_dropped_outside_python_with_two_runtimes() -> None:
    """Fault: with two runtimes alive (one run() on a thread, one on the main
    thread), the last handle of a ForeignRef released by a reference that
    Rust dropped without the GIL (here: the future of a native relay task
    left pending when its runtime ended) runs ForeignRef.__del__ inside the
    other runtime's poll, which re-entered the driver table it held
    borrowed: "RefCell already borrowed" panic. Expected: no panic, no
    "panicked" in stderr, exit 0."""
    body = """
    from shardloop import _shardloop

    def plant():
        # Shard 1 owns the objects; the only handles are held by futures
        # that only a native task of shard 1 references.
        for _ in range(10):
            ref = shardloop.ForeignRef(Obj())
            never = asyncio.get_running_loop().create_future()
            relayed = _shardloop.relay(never)
            relayed.add_done_callback(lambda _f, r=ref: None)

    async def main():
        await shard.submit_to(1, plant)

    for _ in range(8):
        run2(main())
    stop_other()
    gc.collect()
    print("ok", flush=True)
    """
    proc = run_script(scenario(OTHER_RUNTIME, body), timeout=30)
    assert_clean_exit(proc)
    assert "ok" in proc.stdout, describe(proc)


def test_handles_dying_on_other_shards_and_in_the_other_runtime() -> None:
    """Fault: ForeignRef handles whose last reference dies on a shard other
    than the owner, or on a shard of another runtime alive at the same time.
    Expected: no panic, no "panicked" in stderr, every object released once
    both runtimes ended, exit 0."""
    body = """
    HELD = []
    WEAK = []
    handoff = []

    def own():
        obj = Obj()
        WEAK.append(weakref.ref(obj))
        return shardloop.ForeignRef(obj)

    def keep(ref):
        HELD.append(ref)

    def drop_held():
        HELD.clear()
        gc.collect()

    async def main():
        for _ in range(200):
            ref = own()
            await shard.submit_to(1, keep, ref)       # the handle goes to shard 1
            handoff.append(await shard.submit_to(1, own))  # owned by shard 1
            del ref
            await shard.submit_to(1, drop_held)       # ...and dies there
            handoff.append(own())                     # for the other runtime

    async def other_drops():
        while handoff:
            handoff.pop()
            gc.collect()
            await asyncio.sleep(0)

    run2(main())
    # What main() left is dropped inside the other runtime.
    done = threading.Event()
    other2 = threading.Thread(target=lambda: (run2(other_drops()), done.set()))
    other2.start()
    other2.join(15)
    assert done.is_set()
    stop_other()
    HELD.clear()
    handoff.clear()
    gc.collect()
    alive = sum(w() is not None for w in WEAK)
    print("alive", alive, flush=True)
    """
    proc = run_script(scenario(OTHER_RUNTIME, body), timeout=40)
    assert_clean_exit(proc)
    assert "alive 0" in proc.stdout, describe(proc)


def test_objects_are_released_when_their_runtime_ends() -> None:
    """Fault: ForeignRef leaked across runtimes: objects whose handles die
    after run() (or are still held after it) stayed alive after run()
    returned and gc.collect(). Expected: once run() returned and gc ran,
    every object owned through a ForeignRef is released (weakref dead),
    whether its handles died before, or are kept after."""
    body = """
    class Obj:
        pass

    WEAK = []
    KEPT = []

    def own():
        obj = Obj()
        WEAK.append(weakref.ref(obj))
        return shardloop.ForeignRef(obj)

    def keep(ref):
        KEPT.append(ref)

    async def main():
        here = own()
        there = await shard.submit_to(1, own)
        await shard.submit_to(1, keep, here)   # shard 0's object, held on shard 1
        KEPT.append(there)                     # shard 1's object, held on shard 0
        KEPT.append(own())
        assert sum(w() is not None for w in WEAK) == 3

    run2(main())
    gc.collect()
    print("alive with handles kept", sum(w() is not None for w in WEAK), flush=True)
    KEPT.clear()
    gc.collect()
    print("alive after handles died", sum(w() is not None for w in WEAK), flush=True)
    """
    proc = run_script(scenario(body), timeout=20)
    assert_clean_exit(proc)
    assert "alive with handles kept 0" in proc.stdout, describe(proc)
    assert "alive after handles died 0" in proc.stdout, describe(proc)


def test_a_second_runtime_starts_clean() -> None:
    """Fault: a ForeignRef of an earlier runtime was visible in the next one:
    its key found the old object in the new runtime's table (get() returned
    it, invoke() ran on it). Expected: the second run() starts clean: an old
    handle gives a clear exception there (RuntimeError) and never reaches
    an object, and new handles work."""
    body = """
    class Obj:
        def __init__(self, name):
            self.name = name

        def hello(self):
            return self.name

    KEPT = []

    async def first():
        KEPT.append(shardloop.ForeignRef(Obj("old 0")))
        KEPT.append(await shard.submit_to(1, lambda: shardloop.ForeignRef(Obj("old 1"))))

    async def second():
        fresh = shardloop.ForeignRef(Obj("new"))
        print("fresh", fresh.get().name, await fresh.invoke("hello"), flush=True)
        for old in KEPT:
            try:
                print("old get", old.get().name, flush=True)
            except RuntimeError as exc:
                print("old get RuntimeError", exc, flush=True)
            except BaseException as exc:
                print("old get other", type(exc).__name__, exc, flush=True)
            try:
                print("old invoke", await old.invoke("hello"), flush=True)
            except RuntimeError as exc:
                print("old invoke RuntimeError", exc, flush=True)
            except BaseException as exc:
                print("old invoke other", type(exc).__name__, exc, flush=True)

    run2(first())
    gc.collect()
    run2(second())
    """
    proc = run_script(scenario(body), timeout=20)
    assert_clean_exit(proc)
    lines = proc.stdout.splitlines()
    assert "fresh new new" in lines, describe(proc)
    old = [line for line in lines if line.startswith("old ")]
    assert len(old) == 4, describe(proc)
    for line in old:
        assert "RuntimeError" in line, describe(proc)
        assert "old 0" not in line and "old 1" not in line, describe(proc)


def test_foreign_ref_after_its_runtime_off_any_shard() -> None:
    """Fault: a ForeignRef used after its runtime ended, off any shard.
    Expected: get() raises a clear RuntimeError; dropping it is silent."""
    body = """
    KEPT = []

    async def main():
        KEPT.append(shardloop.ForeignRef([1, 2, 3]))

    run2(main())
    try:
        KEPT[0].get()
        print("get: no error", flush=True)
    except RuntimeError as exc:
        print("get: RuntimeError", exc, flush=True)
    KEPT.clear()
    gc.collect()
    print("dropped", flush=True)
    """
    proc = run_script(scenario(body), timeout=20)
    assert_clean_exit(proc)
    assert "get: RuntimeError" in proc.stdout, describe(proc)
    assert "dropped" in proc.stdout, describe(proc)
    assert "Exception ignored" not in proc.stderr, describe(proc)
