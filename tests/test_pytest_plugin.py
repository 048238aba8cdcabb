"""The pytest plugin: ``@pytest.mark.shardloop`` tests, its fixtures, its
timeout, and pytest-asyncio beside it. Each case runs pytest in a process
of its own (pytester), as a user's suite would."""

from __future__ import annotations

import textwrap
import time

import pytest

pytest_plugins = ["pytester"]


def run_suite(
    pytester: pytest.Pytester, source: str, *args: str, **expected: int
) -> pytest.RunResult:
    pytester.makepyfile(test_suite=textwrap.dedent(source))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)
    result.assert_outcomes(**expected)
    return result


def test_a_marked_test_runs_on_shard_0_of_a_fresh_runtime(pytester: pytest.Pytester) -> None:
    run_suite(
        pytester,
        """
        import asyncio, os, pytest
        import shardloop
        from shardloop import shard

        runtimes = set()

        @pytest.mark.shardloop(shards=3)
        async def test_three_shards():
            assert shard.id() == 0 and shard.count() == 3
            assert isinstance(asyncio.get_running_loop(), shardloop.ShardLoop)
            assert await shard.submit_to(2, shard.id) == 2
            runtimes.add(id(asyncio.get_running_loop()))

        @pytest.mark.shardloop
        async def test_two_by_default_and_a_fresh_runtime():
            assert shard.count() == 2
            runtimes.add(id(asyncio.get_running_loop()))
            assert len(runtimes) == 2

        FIRST = min(os.sched_getaffinity(0))

        @pytest.mark.shardloop(shards=1, cpuset=[FIRST], pin=True, stall_threshold=None)
        async def test_run_options_pass_through():
            assert os.sched_getaffinity(0) == {FIRST}

        @pytest.mark.parametrize("target", [0, 1])
        @pytest.mark.shardloop
        async def test_parametrized(target):
            assert await shard.submit_to(target, shard.id) == target

        @pytest.mark.shardloop
        async def test_a_remote_failure_fails_the_test():
            def boom():
                raise KeyError("remote")
            await shard.submit_to(1, boom)
        """,
        passed=5,
        failed=1,
    ).stdout.fnmatch_lines(["*KeyError: 'remote'*"])


def test_the_server_fixture_serves_on_a_free_port_and_closes_after(
    pytester: pytest.Pytester,
) -> None:
    run_suite(
        pytester,
        """
        import asyncio, socket, pytest

        ports = []

        async def echo(reader, writer):
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        @pytest.mark.shardloop
        async def test_echo(shardloop_server):
            server = await shardloop_server(echo)
            ports.append(server.port)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"hi\\n")
            assert await reader.readline() == b"hi\\n"
            writer.close()

        def test_closed_after():
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", ports[0]), timeout=5)

        def test_only_in_a_shardloop_test(shardloop_server):
            pass
        """,
        passed=2,
        errors=1,
    ).stdout.fnmatch_lines(["*shardloop_server serves from the shards*"])


def test_a_test_past_its_timeout_fails_with_every_threads_stack(
    pytester: pytest.Pytester,
) -> None:
    began = time.monotonic()
    result = run_suite(
        pytester,
        """
        import asyncio, time, pytest
        from shardloop import shard

        async def waits_forever():
            await asyncio.sleep(3600)

        @pytest.mark.shardloop(timeout=1)
        async def test_waits_on_a_shard():
            await shard.submit_to(1, waits_forever)

        @pytest.mark.shardloop(timeout=1)
        async def test_blocks_shard_0():
            time.sleep(3600)

        def test_the_suite_goes_on():
            pass
        """,
        passed=1,
        failed=2,
    )
    result.stdout.fnmatch_lines(
        [
            "*test_waits_on_a_shard still ran after 1 s; every thread's stack and every shard's*",
            "*=== shard 1: 1 task(s)*",
            "*in waits_forever*",
            "*test_blocks_shard_0 still ran after 1 s*",
            "*in test_blocks_shard_0*",
            "*shard 0 is busy: its tasks cannot be listed*",
        ]
    )
    assert time.monotonic() - began < 60


def test_it_coexists_with_pytest_asyncio_in_strict_and_auto_mode(
    pytester: pytest.Pytester,
) -> None:
    source = """
        import asyncio, pytest
        import shardloop

        @pytest.mark.asyncio
        async def test_on_pytest_asyncio(shardloop_runtime):
            loop = asyncio.get_running_loop()
            assert not isinstance(loop, shardloop.ShardLoop)
            assert await shardloop_runtime.call(1, sum, [1, 2]) == 3

        @pytest.mark.shardloop
        async def test_on_shardloop():
            assert isinstance(asyncio.get_running_loop(), shardloop.ShardLoop)

        def test_sync_with_a_runtime(shardloop_runtime):
            assert shardloop_runtime.submit_to(1, abs, -2).result(10) == 2
        """
    for mode in ("strict", "auto"):
        run_suite(pytester, source, "-p", "asyncio", "--asyncio-mode", mode, passed=3)


def test_misuse_is_a_clear_error(pytester: pytest.Pytester) -> None:
    result = run_suite(
        pytester,
        """
        import pytest

        @pytest.mark.shardloop
        def test_not_async():
            pass

        @pytest.mark.shardloop(timeout=0)
        async def test_bad_timeout():
            pass

        @pytest.mark.shardloop(shards=0)
        async def test_no_shards():
            pass

        @pytest.mark.shardloop(shard=3)
        async def test_a_typo():
            pass
        """,
        failed=4,
    )
    result.stdout.fnmatch_lines(
        [
            "*runs an async def test; test_not_async is not one*",
            "*timeout must be a positive number of seconds, not 0*",
            "*shards must be at least 1*",
            "*has no option shard (it takes shards=, timeout= and cpuset, *",
        ]
    )
    assert "never awaited" not in result.stdout.str() + result.stderr.str()
