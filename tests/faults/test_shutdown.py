"""Shutdown with work in flight: nothing admitted is lost, follow-up calls
of admitted work still run, and the shard API after its runtime."""

from __future__ import annotations

from ._harness import SCALE, SHUTDOWN_PROBE, assert_clean_exit, describe, run_script, scenario


def test_follow_up_calls_made_during_the_drain_succeed() -> None:
    """Fault: a coroutine still running on shard 1 after main() returned,
    calling shard.submit_to(0, ...) itself, got ShutdownError: the
    follow-up call was lost. Expected: work already admitted may make its
    follow-up calls until the drain ends; they succeed (each result is
    printed by the child), in chains too, and run() returns."""
    body = """
    def double(x):
        return 2 * x

    async def chain(x):
        # A follow-up of a follow-up: shard 0 calls back to shard 1.
        return await shard.submit_to(1, double, x) + 1

    async def late():
        await wait_for_shutdown()
        for what, call in (
            ("plain", lambda: shard.submit_to(0, double, 21)),
            ("chained", lambda: shard.submit_to(0, chain, 10)),
            ("all", lambda: shard.invoke_on_all(double, 1)),
        ):
            try:
                print("follow-up", what, await call(), flush=True)
            except BaseException as exc:
                print("follow-up", what, "raised", type(exc).__name__, exc, flush=True)

    async def main():
        MAIN.append(asyncio.current_task())
        shard.submit_to(1, late)
        await asyncio.sleep(0.01)

    started = time.monotonic()
    run2(main())
    print("run() took %.2f" % (time.monotonic() - started), flush=True)
    """
    proc = run_script(scenario(SHUTDOWN_PROBE, body), timeout=20)
    assert_clean_exit(proc)
    lines = proc.stdout.splitlines()
    for expected in ("follow-up plain 42", "follow-up chained 21", "follow-up all [2, 2]"):
        assert expected in lines, describe(proc)
    seconds = float(proc.stdout.split("run() took")[1].split()[0])
    assert seconds < 4, describe(proc)


def test_calls_in_flight_at_shutdown_all_complete() -> None:
    """Fault: shutdown while 10^5 calls (10^6 with SHARDLOOP_FAULT_SCALE=10)
    are in flight in both directions, plain and coroutine, when main()
    returns. Expected: every admitted call ran exactly once (or was
    reported); none is lost, and run() returns."""
    n = 100_000 * SCALE
    body = f"""
    import inspect
    N = {n}
    COUNT = [0, 0]

    def hit():
        COUNT[shard.id()] += 1

    async def async_hit():
        await asyncio.sleep(0)
        COUNT[shard.id()] += 1

    async def from_shard_1(n):
        for i in range(n):
            shard.submit_to(0, hit)
            if i % 1000 == 999:
                await asyncio.sleep(0)
        return n

    async def main():
        admitted = await shard.submit_to(1, from_shard_1, N // 4)
        for i in range(N // 2):
            shard.submit_to(1, hit)
            admitted += 1
            if i % 1000 == 999:
                await asyncio.sleep(0)
        for i in range(N // 4):
            shard.submit_to(1, async_hit)
            admitted += 1
        return admitted  # with calls still in flight

    kwargs = {{}}
    if "shutdown_timeout" in inspect.signature(shardloop.run).parameters:
        kwargs["shutdown_timeout"] = 300
    admitted = run2(main(), **kwargs)
    print("admitted", admitted, "ran", sum(COUNT), COUNT, flush=True)
    """
    proc = run_script(scenario(body), timeout=60 * SCALE)
    assert_clean_exit(proc)
    assert f"admitted {n} ran {n} " in proc.stdout, describe(proc)


def test_shard_api_after_its_runtime_raises_clearly() -> None:
    """Fault: shard.submit_to, invoke_on_all, id and count used after run()
    returned. Expected: a clear RuntimeError saying there is no shard here
    (nothing sent, nothing hangs)."""
    body = """
    async def main():
        return shard.count()

    run2(main())

    def coro_call(fn):
        def call():
            coro = fn(sum, [1])
            try:
                asyncio.run(asyncio.wait_for(coro, 2))
            finally:
                coro.close()
        return call

    for name, call in (
        ("submit_to", lambda: shard.submit_to(1, sum, [1])),
        ("invoke_on_all", coro_call(shard.invoke_on_all)),
        ("id", shard.id),
        ("count", shard.count),
    ):
        try:
            call()
            print(name, "no error", flush=True)
        except RuntimeError as exc:
            print(name, "RuntimeError", exc, flush=True)
        except BaseException as exc:
            print(name, "other", type(exc).__name__, exc, flush=True)
    """
    proc = run_script(scenario(body), timeout=15)
    assert_clean_exit(proc)
    lines = proc.stdout.splitlines()
    for name in ("submit_to", "invoke_on_all", "id", "count"):
        line = next((x for x in lines if x.startswith(name + " ")), "")
        assert line.startswith(f"{name} RuntimeError"), describe(proc)
        assert "shard" in line.split("RuntimeError", 1)[1], describe(proc)
