"""Every fault test is bounded: a test that runs longer than its limit dumps
every thread's stack and stops the test process (scenarios that run in a
child process are bounded there too, see _harness.py)."""

from __future__ import annotations

import faulthandler
import sys
from collections.abc import Iterator

import pytest

from ._harness import SCALE

# Longer than any scenario's own limit: this only catches a test process
# that is stuck itself.
TEST_LIMIT = 150 * SCALE


@pytest.fixture(autouse=True)
def bounded_in_time() -> Iterator[None]:
    faulthandler.dump_traceback_later(TEST_LIMIT, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
