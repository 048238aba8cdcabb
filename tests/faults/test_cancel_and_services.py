"""Cancelling remote calls, and Sharded services whose start fails."""

from __future__ import annotations

import pytest

from ._harness import Child, assert_clean_exit, describe, run_script, scenario

CANCEL = """
STATE = {"started": False, "cancelled": False}

async def slow():
    STATE["started"] = True
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        STATE["cancelled"] = True
        raise

def read_state():
    return dict(STATE)

class Starter:
    def __call__(self):
        return slow()

def make(kind):
    return {
        "lambda": lambda: slow(),
        "callable object": Starter(),
        "coroutine function": slow,
    }[kind]

async def main(kind):
    call = shard.submit_to(1, make(kind))
    while not (await shard.submit_to(1, read_state))["started"]:
        await asyncio.sleep(0.001)
    call.cancel()
    try:
        await call
    except asyncio.CancelledError:
        pass
    # The cancellation travels to shard 1: give it up to 2 s.
    for _ in range(200):
        state = await shard.submit_to(1, read_state)
        if state["cancelled"]:
            break
        await asyncio.sleep(0.01)
    print("cancelled on shard 1:", state["cancelled"], flush=True)
"""


@pytest.mark.parametrize("kind", ["lambda", "callable object", "coroutine function"])
def test_cancelling_a_call_cancels_the_coroutine_it_started(kind: str) -> None:
    """Fault: cancelling a call of a plain callable that returns a coroutine
    (submit_to(1, lambda: slow())) did not cancel the coroutine on shard 1,
    which then held shutdown up. Expected: the coroutine is cancelled on
    shard 1 (its except CancelledError ran, read back with another call),
    and run() returns promptly."""
    body = f"""
    started = time.monotonic()
    run2(main({kind!r}))
    print("run() took %.2f" % (time.monotonic() - started), flush=True)
    """
    with Child(scenario(CANCEL, body), timeout=15) as child:
        # Fails at once when the coroutine was not cancelled (shutdown would
        # then wait for it).
        verdict = child.read_line("cancelled on shard 1:")
        assert verdict == "cancelled on shard 1: True", f"{verdict}\n{child.report()}"
        proc = child.finish()
    assert_clean_exit(proc)
    seconds = float(proc.stdout.split("run() took")[1].split()[0])
    assert seconds < 4, describe(proc)


SERVICE = """
EVENTS = []

class Service:
    def __init__(self, failing):
        self.failing = failing
        self.task = None

    async def start(self):
        if shard.id() == self.failing:
            await asyncio.sleep(0.01)
            raise ValueError("cannot start on shard %d" % shard.id())
        # The shards that start do so after the failure was raised.
        await asyncio.sleep(0.1)
        self.task = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
        EVENTS.append(("start", shard.id()))

    async def stop(self):
        EVENTS.append(("stop", shard.id()))
        if self.task is not None:
            self.task.cancel()
"""


@pytest.mark.parametrize("failing", [0, 1])
def test_sharded_start_failing_on_one_shard_stops_the_others(failing: int) -> None:
    """Fault: Sharded(cls).start() where cls's start() raised on one shard
    left the instances started on the other shards running for ever.
    Expected: start() raises the error, every instance that did start had
    its stop() called (on its own shard), and the runtime stops
    promptly."""
    body = f"""
    async def main():
        svc = shardloop.Sharded(Service, {failing})
        try:
            await asyncio.wait_for(svc.start(), 10)
            print("start() returned", flush=True)
        except ValueError as exc:
            print("start() raised", exc, flush=True)
        # The other shard's start() may still be finishing: give its
        # clean-up up to 2 s.
        for _ in range(200):
            if ("stop", {1 - failing}) in EVENTS:
                break
            await asyncio.sleep(0.01)
        print("events", sorted(EVENTS), flush=True)

    started = time.monotonic()
    run2(main())
    print("run() took %.2f" % (time.monotonic() - started), flush=True)
    """
    proc = run_script(scenario(SERVICE, body), timeout=15)
    assert_clean_exit(proc)
    assert f"start() raised cannot start on shard {failing}" in proc.stdout, describe(proc)
    other = 1 - failing
    expected = sorted([("start", other), ("stop", other)])
    assert f"events {expected}" in proc.stdout, describe(proc)
    seconds = float(proc.stdout.split("run() took")[1].split()[0])
    assert seconds < 4, describe(proc)
