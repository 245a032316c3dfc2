"""What a client has asked a server for and not yet got: its requests in flight, and
the window that bounds them (docs/wire.md).

Background requests share a *window* of bytes in flight that grows as answers arrive
(slow start, up to :data:`MAX_WINDOW`), so a pull keeps a long link full instead of
waiting a round trip per chunk; requests of every priority together stay under the
server's limit, with room kept for demand requests (the VM waits on those).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import zstandard

from drafter.chunks import ChunkData, Deliver
from drafter.errors import DrafterError
from drafter.hashes import digest
from drafter.transport import protocol as wire
from drafter.transport.protocol import ChunkHead, ErrorCode, ProtocolError

INITIAL_WINDOW = 16 << 20  # requests wait at the server, where demand overtakes them
MAX_WINDOW = 128 << 20
_MAX_BACKGROUND_REQUESTS = wire.MAX_OUTSTANDING - 64  # room for demand requests
# Requests of every priority together stay under the server's limit; prefetches and
# background requests leave room for demand ones.
_MAX_REQUESTS = wire.MAX_OUTSTANDING - 16
_MAX_QUEUED_REQUESTS = wire.MAX_OUTSTANDING - 128


class VerificationError(DrafterError):
    """A chunk's bytes did not match its hash: never handed to the VM."""


@dataclass
class ClientStats:
    chunks: int = 0  # chunks fetched with data
    zero_chunks: int = 0  # chunks that arrived as the zero marker
    bytes: int = 0  # logical bytes of fetched chunks
    wire_bytes: int = 0  # payload bytes as they came over the wire (compressed)
    verify_failures: int = 0
    reconnects: int = 0  # times a lost connection was re-established


@dataclass(eq=False)
class Pending:
    """A request for ``count`` consecutive chunks from ``index``, answered in order."""

    resource: int
    index: int  # the next chunk to arrive
    count: int  # chunks still to arrive
    priority: int
    expected: deque[bytes | None]  # the hash each chunk still to arrive must have
    deliver: Deliver
    future: asyncio.Future[None]
    windowed: int = 0  # bytes of it still counted in the window
    sent: float = 0.0  # loop time it was first sent (fetch latency counts reconnects too)

    def verify(
        self,
        head: ChunkHead,
        payload: memoryview,
        size: int,
        where: str,
        dctx: zstandard.ZstdDecompressor,
        stats: ClientStats,
    ) -> ChunkData:
        """The bytes of this request's next chunk (``size`` bytes) from a CHUNK frame,
        unpacked and verified against their hash and the one expected; ProtocolError
        or VerificationError (``where`` names the chunk's resource and server)."""
        if (head.resource, head.index, head.length) != (self.resource, self.index, size):
            raise ProtocolError(
                ErrorCode.PROTOCOL, f"answer for another chunk than {self.index} of {where}"
            )
        if head.flags & wire.CHUNK_ZERO:
            if payload or head.hash != wire.ZERO_HASH:
                raise ProtocolError(ErrorCode.PROTOCOL, "malformed zero marker")
            data: ChunkData = bytes(size)
            stats.zero_chunks += 1
        else:
            if head.flags & wire.CHUNK_ZSTD:
                try:
                    if zstandard.frame_content_size(payload) != size:
                        raise ProtocolError(ErrorCode.PROTOCOL, "compressed chunk of wrong size")
                    data = dctx.decompress(payload)
                except zstandard.ZstdError:
                    raise ProtocolError(ErrorCode.PROTOCOL, "malformed compressed chunk") from None
            else:
                data = payload
            if len(data) != size:
                raise ProtocolError(
                    ErrorCode.PROTOCOL,
                    f"chunk {self.index} of {where} has {len(data)} bytes, not {size}",
                )
            if digest(data) != head.hash:
                stats.verify_failures += 1
                raise VerificationError(
                    f"chunk {self.index} of {where} failed verification "
                    "(its bytes do not match their hash): refused it"
                )
            stats.chunks += 1
            stats.bytes += size
            stats.wire_bytes += len(payload)
        expected = self.expected[0]
        if expected is not None and head.hash != expected:
            stats.verify_failures += 1
            raise VerificationError(
                f"chunk {self.index} of {where} does not match the hash "
                "the manifest gave for it: refused it"
            )
        return data


class Window:
    """Bytes of background requests in flight and unanswered requests of every
    priority, with the requests waiting for room (one client's, on its loop)."""

    def __init__(self) -> None:
        self.size = INITIAL_WINDOW
        self.in_flight = 0  # bytes of background requests sent and not answered
        self.in_flight_requests = 0
        self.requests = 0  # requests of every priority sent (or about to be) and unanswered
        self._demand_waiters: deque[asyncio.Future[None]] = deque()
        self._other_waiters: deque[asyncio.Future[None]] = deque()
        self._window_waiters: deque[asyncio.Future[None]] = deque()

    def grow(self, size: int) -> None:
        """``size`` bytes of a background request arrived: slow start."""
        if self.size < MAX_WINDOW:
            self.size = min(MAX_WINDOW, self.size + size)

    async def admit(self, pending: Pending, size: int) -> None:
        """Wait until a background request fits in the window of bytes in flight."""
        while self.in_flight and (
            self.in_flight + size > self.size or self.in_flight_requests >= _MAX_BACKGROUND_REQUESTS
        ):
            waiter = asyncio.get_running_loop().create_future()
            self._window_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                self._wake()  # pass the turn on
                raise
        self.in_flight += size
        self.in_flight_requests += 1
        pending.windowed = size

    async def take_slot(self, demand: bool) -> None:
        """Wait until one more request keeps every priority's total under the cap."""
        cap, waiters = (
            (_MAX_REQUESTS, self._demand_waiters)
            if demand
            else (_MAX_QUEUED_REQUESTS, self._other_waiters)
        )
        while self.requests >= cap:
            waiter = asyncio.get_running_loop().create_future()
            waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                self.give_slot(taken=False)  # pass the turn on
                raise
        self.requests += 1

    def give_slot(self, taken: bool = True) -> None:
        if taken:
            self.requests -= 1
        for cap, waiters in (
            (_MAX_REQUESTS, self._demand_waiters),
            (_MAX_QUEUED_REQUESTS, self._other_waiters),
        ):
            while waiters and self.requests < cap:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    break

    def release(self, pending: Pending, size: int) -> None:
        """``size`` bytes of a background request arrived (or will not)."""
        if not pending.windowed or not size:
            return
        pending.windowed -= size
        self.in_flight -= size
        if not pending.windowed:
            self.in_flight_requests -= 1
        # Refill in bursts (an eighth of the window at a time): the requests of a burst
        # leave in one send instead of one each.
        if self.size - self.in_flight >= self.size // 8 or not self.in_flight:
            self._wake(all_of_them=True)

    def _wake(self, all_of_them: bool = False) -> None:
        while self._window_waiters:
            waiter = self._window_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not all_of_them:
                    return
