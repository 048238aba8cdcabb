"""Runs CPython's own asyncio test suite (Lib/test/test_asyncio) with every
new event loop a shardloop runtime, and prints what passed and failed.

    python scripts/cpython_asyncio_suite.py [module ...]

Tests that build their own loop class (the suite's TestLoop, the proactor
and the Windows tests) do not exercise shardloop and are left to the suite's
own skips. The exception is test_events' event-loop tests (sockets,
servers, connections, transports, subprocesses, signals), which build
`SelectorEventLoop`s: they run here against a shard loop too
(`ShardLoopEventLoopTests`).
"""

from __future__ import annotations

import asyncio
import faulthandler
import sys
import unittest

import shardloop

DEFAULT_MODULES = [
    "test_futures",
    "test_futures2",
    "test_locks",
    "test_queues",
    "test_taskgroups",
    "test_timeouts",
    "test_waitfor",
    "test_tasks",
    "test_streams",
    "test_server",
    "test_sock_lowlevel",
    "test_context",
    "test_pep492",
    "test_runners",
    "test_events",
    "test_subprocess",
    "test_threads",
]


class Policy(shardloop.EventLoopPolicy):
    """Two unpinned shards per loop, so that many loops can be made quickly."""

    def new_event_loop(self) -> shardloop.ShardLoop:
        return shardloop.new_event_loop(2, pin=False)


# Tests of test_events' mixin that check what a shard loop does differently
# on purpose, with the reason.
DIFFERENT_ON_PURPOSE = {
    "test_create_connection": "checks isinstance(transport, asyncio.Transport): "
    "shardloop's socket transport is a Rust class (as uvloop's is a Cython one)",
    "test_create_unix_connection": "as test_create_connection",
}


def shard_loop_event_tests() -> unittest.TestSuite:
    """CPython's event-loop tests (test_events.EventLoopTestsMixin and its
    Unix and subprocess parts), which build their loops themselves, run
    against a shard loop."""
    from test.test_asyncio import test_events
    from test.test_asyncio import utils as test_utils

    mixins = [test_events.EventLoopTestsMixin]
    unix = getattr(test_events, "UnixEventLoopTestsMixin", None)
    if unix is not None:
        mixins = [unix]
    subprocess = getattr(test_events, "SubprocessTestsMixin", None)
    if subprocess is not None:
        mixins.append(subprocess)

    class ShardLoopEventLoopTests(*mixins, test_utils.TestCase):  # type: ignore[misc]
        def create_event_loop(self) -> asyncio.AbstractEventLoop:
            return shardloop.new_event_loop(2, pin=False)

    for name, reason in DIFFERENT_ON_PURPOSE.items():
        setattr(
            ShardLoopEventLoopTests,
            name,
            unittest.skip(reason)(getattr(ShardLoopEventLoopTests, name)),
        )
    return unittest.defaultTestLoader.loadTestsFromTestCase(ShardLoopEventLoopTests)


# No test may hang the run: past this, every thread's stack is dumped and
# the process ends (the suite's own slowest tests take a few seconds).
TEST_LIMIT = 120


class BoundedResult(unittest.TextTestResult):
    """Re-arms a watchdog for every test."""

    def startTest(self, test: unittest.TestCase) -> None:
        faulthandler.dump_traceback_later(TEST_LIMIT, exit=True, file=sys.__stderr__)
        super().startTest(test)

    def stopTest(self, test: unittest.TestCase) -> None:
        super().stopTest(test)
        faulthandler.cancel_dump_traceback_later()


def main() -> int:
    modules = sys.argv[1:] or DEFAULT_MODULES
    original = asyncio.DefaultEventLoopPolicy
    # The suite resets the policy between tests; make its default ours.
    asyncio.DefaultEventLoopPolicy = Policy  # type: ignore[misc]
    asyncio.set_event_loop_policy(Policy())
    suite = unittest.defaultTestLoader.loadTestsFromNames(f"test.test_asyncio.{m}" for m in modules)
    if "test_events" in modules:
        suite.addTests(shard_loop_event_tests())
    runner = unittest.TextTestRunner(verbosity=1, stream=sys.stdout, resultclass=BoundedResult)
    result = runner.run(suite)
    asyncio.DefaultEventLoopPolicy = original  # type: ignore[misc]
    print(
        f"\nran {result.testsRun}, failures {len(result.failures)}, errors {len(result.errors)}, "
        f"skipped {len(result.skipped)}"
    )
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
