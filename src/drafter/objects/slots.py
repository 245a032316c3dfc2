"""Which range request of an object source goes next, and how many bytes may be on
their way: demand first, and no more prefetch or background bytes in flight than the
link needs to stay full.

An object store has no priorities of its own: every request in flight shares the
link and the store with the others, so a demand fault that arrives behind 128 MiB of
background runs waits for all of them (a second at 1 Gbit/s). So requests that are
not demands may have at most :attr:`RequestSlots.budget` bytes in flight, which
:class:`Budget` keeps at about twice the bandwidth-delay product it measures (the
rate of the bytes that arrive, times the shortest round trip seen), never under
:data:`FLOOR` (bench/sources.py: SeaweedFS serves 4 MiB ranges at 365 MiB/s with two in
flight, and at p50 250 ms each with 32). Demands only wait for a request slot.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import time
from types import TracebackType

from drafter.chunks import Priority

FLOOR = 32 << 20  # non-demand bytes in flight, at least
CEILING = 512 << 20  # and at most
WINDOW = 2.0  # seconds of arrivals the rate is measured over
SMALL = 1 << 20  # requests up to this size measure the round trip

_RANK: dict[int, int] = {Priority.DEMAND: 0, Priority.PREFETCH: 1, Priority.BACKGROUND: 2}


class Budget:
    """The bytes that keep a link full: ``2 x rate x round trip``, within
    FLOOR..CEILING. ``arrived`` is told of every answered request."""

    def __init__(self) -> None:
        self.rtt: float | None = None  # the shortest answer to a small request, seconds
        self._arrivals: collections.deque[tuple[float, int]] = collections.deque()
        self._bytes = 0

    def arrived(self, nbytes: int, seconds: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if nbytes <= SMALL and (self.rtt is None or seconds < self.rtt):
            self.rtt = seconds
        self._arrivals.append((now, nbytes))
        self._bytes += nbytes
        while self._arrivals and self._arrivals[0][0] < now - WINDOW:
            self._bytes -= self._arrivals.popleft()[1]

    def rate(self) -> float:
        """Bytes a second over the last WINDOW seconds of arrivals."""
        if len(self._arrivals) < 2:
            return 0.0
        span = max(self._arrivals[-1][0] - self._arrivals[0][0], WINDOW / 4)
        return self._bytes / span

    def bytes(self) -> int:
        if self.rtt is None:
            return FLOOR
        return int(min(CEILING, max(FLOOR, 2 * self.rate() * self.rtt)))


class RequestSlots:
    """At most ``limit`` requests at once, and at most ``budget`` bytes of requests
    that are not demands (one such request always may go when none is in flight);
    waiters go in priority order, then FIFO."""

    def __init__(self, limit: int, budget: int = FLOOR) -> None:
        self.limit = limit
        self.budget = budget
        self.busy = 0  # requests in flight
        self.queued_bytes = 0  # bytes of the non-demand requests in flight
        self._waiting: list[tuple[int, int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def slot(self, priority: int, nbytes: int) -> RequestSlot:
        return RequestSlot(self, priority, nbytes)

    def _fits(self, rank: int, nbytes: int) -> bool:
        if self.busy >= self.limit:
            return False
        return rank == 0 or self.queued_bytes == 0 or self.queued_bytes + nbytes <= self.budget

    def _grant(self, rank: int, nbytes: int) -> None:
        self.busy += 1
        if rank:
            self.queued_bytes += nbytes

    async def take(self, priority: int, nbytes: int) -> None:
        rank = _RANK[priority]
        if not self._waiting and self._fits(rank, nbytes):
            self._grant(rank, nbytes)
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (rank, next(self._order), nbytes, future))
        self._dispatch()
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.give(priority, nbytes)  # it was handed the slot as it was cancelled
            else:
                future.cancel()
                self._dispatch()  # a waiter behind it may fit now
            raise

    def give(self, priority: int, nbytes: int) -> None:
        self.busy -= 1
        if _RANK[priority]:
            self.queued_bytes -= nbytes
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand slots to the waiters at the head of the queue while they fit."""
        while self._waiting:
            rank, _, nbytes, future = self._waiting[0]
            if future.done():
                heapq.heappop(self._waiting)
                continue
            if not self._fits(rank, nbytes):
                return
            heapq.heappop(self._waiting)
            self._grant(rank, nbytes)
            future.set_result(None)


class RequestSlot:
    def __init__(self, slots: RequestSlots, priority: int, nbytes: int) -> None:
        self._slots, self._priority, self._nbytes = slots, priority, nbytes

    async def __aenter__(self) -> None:
        await self._slots.take(self._priority, self._nbytes)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._slots.give(self._priority, self._nbytes)
