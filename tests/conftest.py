"""Shared fixtures: the same behavioural tests run on stock asyncio and on a
shard loop, so that "asyncio-compatible" is a measured claim."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import shardloop

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
