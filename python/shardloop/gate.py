"""A cross-shard gate, Seastar's ``gate``: work enters it on any shard, and
``close()`` (from any shard) waits for all the work inside to leave before
a service stops. Once closed, entering raises :class:`GateClosedError`.

    gate = Gate()

    async def handle(request):
        with gate.hold():          # GateClosedError once stopping
            return await work(request)

    async def stop():
        await gate.close()         # every shard's work has left
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from . import shard

__all__ = ["Gate", "GateClosedError"]


class GateClosedError(RuntimeError):
    """The gate is closed: the work was not started."""


class Gate:
    """Counts the work inside it on each shard; see the module's text. A
    gate belongs to one runtime at a time (its counts are by shard index).

    Each shard touches only its own count, so no lock is needed: ``close()``
    marks the gate closed and then asks every shard, with a cross-shard
    call, to wait until its own count is zero. A shard sees the mark before
    it runs that call, so whatever it lets in after has to see it too.
    """

    def __init__(self) -> None:
        self._closed = False
        self._inside: dict[int, int] = {}
        self._drained: dict[int, asyncio.Future[None]] = {}

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def count(self) -> int:
        """How much work is inside the gate on this shard."""
        return self._inside.get(shard.id(), 0)

    def enter(self) -> None:
        """Lets one unit of work in on this shard (pair it with :meth:`leave`);
        :class:`GateClosedError` once the gate is closed."""
        if self._closed:
            raise GateClosedError("the gate is closed")
        me = shard.id()
        self._inside[me] = self._inside.get(me, 0) + 1

    def leave(self) -> None:
        """Lets one unit of work out, on the shard that entered it."""
        me = shard.id()
        left = self._inside.get(me, 0) - 1
        if left < 0:
            raise RuntimeError("Gate.leave() without a matching enter() on this shard")
        self._inside[me] = left
        drained = self._drained.get(me)
        if left == 0 and drained is not None and not drained.done():
            drained.set_result(None)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """``with gate.hold():`` enters the gate and leaves it after the
        block (which may await)."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    async def close(self) -> None:
        """Closes the gate and waits until no work is inside it on any shard
        (from any shard; closing again waits the same way)."""
        self._closed = True
        await shard.invoke_on_all(self._drain_local)

    async def _drain_local(self) -> None:
        me = shard.id()
        if self._inside.get(me, 0) == 0:
            return
        drained = self._drained.get(me)
        if drained is None or drained.done():
            drained = asyncio.get_running_loop().create_future()
            self._drained[me] = drained
        await asyncio.shield(drained)
