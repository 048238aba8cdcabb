"""Shared fixtures: the same behavioural tests run on stock asyncio and on a
shard loop, so that "asyncio-compatible" is a measured claim."""

from __future__ import annotations

import asyncio
import faulthandler
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import shardloop


@pytest.fixture
def test_limit() -> float:
    """Seconds a test may run; a folder or module with slower tests
    overrides this fixture."""
    return 120


@pytest.fixture(autouse=True)
def bounded_in_time(test_limit: float) -> Iterator[None]:
    """No test may hang the suite: past its limit, every thread's stack is
    dumped and the test process ends."""
    faulthandler.dump_traceback_later(test_limit, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "shardloop": lambda: shardloop.new_event_loop(2, pin=False),
}


@pytest.fixture(params=sorted(LOOPS))
def run_on(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Runs a coroutine to completion on the parametrised kind of loop."""
    factory = LOOPS[request.param]

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(coro, timeout=30))

    return run


def run2(coro: Coroutine[Any, Any, Any], shards: int = 2, **kwargs: Any) -> Any:
    """shardloop.run on unpinned shards, bounded in time."""
    return shardloop.run(asyncio.wait_for(coro, timeout=30), shards=shards, pin=False, **kwargs)


# The load generator's helpers (tools/loadgen.py: drive, free_port, ...) are
# not part of the package; the tests import them as `loadgen`.
TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
