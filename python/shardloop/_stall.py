"""Stall reports: what the watchdog of a runtime started with a
``stall_threshold`` says through ``logging`` (logger ``shardloop``).

The watchdog itself is native (``_shardloop.Watchdog``): a thread that
looks at every shard's open turn without taking the GIL, and calls
:func:`report` only when a turn passes the threshold and when it ends.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

log = logging.getLogger("shardloop")


def _name(func: Any) -> str:
    module = getattr(func, "__module__", None)
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return f"{module}.{name}" if module else str(name)


def report(shard: int, seconds: float, thread_id: int, serving: Any, ended: bool) -> None:
    """Logs a stall of `shard`: when it is caught (with the shard thread's
    Python stack and the plain function it serves, if any), and when it
    ends (with its whole length)."""
    if ended:
        log.warning("shard %d: the stall ended after %.1f ms", shard, seconds * 1000)
        return
    frame = sys._current_frames().get(thread_id)
    stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)\n"
    serving_text = f" serving {_name(serving)}()" if serving is not None else ""
    log.warning(
        "shard %d stalled%s: %.1f ms without returning to its loop; its stack:\n%s",
        shard,
        serving_text,
        seconds * 1000,
        stack.rstrip("\n"),
    )
