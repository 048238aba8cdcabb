"""Every fault test is bounded (tests/conftest.py): a test that runs longer
than this folder's limit dumps every thread's stack and stops the test
process (scenarios that run in a child process are bounded there too, see
_harness.py)."""

from __future__ import annotations

import pytest

from ._harness import SCALE

# Longer than any scenario's own limit: this only catches a test process
# that is stuck itself.
TEST_LIMIT = 150 * SCALE


@pytest.fixture
def test_limit() -> float:
    return TEST_LIMIT
