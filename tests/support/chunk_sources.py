"""A chunk source over bytes in memory, for unit tests of what fetches chunks (the
device, the pull pool): it records every request and can hold, fail, drop or cut
what it delivers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from drafter.chunks import ChunkSource, Deliver, Priority, chunk_count
from drafter.errors import DrafterError
from drafter.hashes import chunk_hash

CS = 4096  # chunk size of most devices in the unit tests


@dataclass(frozen=True, order=True)
class Call:
    """One request a source was asked for."""

    resource: str
    start: int
    count: int
    priority: Priority


def pattern(size: int, seed: int = 1) -> bytes:
    """``size`` bytes where every chunk of CS differs from the others and from zeros."""
    return bytes((seed + i // CS * 7 + i % 251) % 255 + 1 for i in range(size))


@dataclass
class FakeSource:
    """A :class:`ChunkSource` over bytes in memory.

    ``hold[priority]``: requests at that priority wait for the event first. ``fail``:
    chunks whose request raises DrafterError every time; ``fail_once``: the first time
    only. ``wrong_size``: chunks delivered one byte short. ``drop``: chunks the source
    says nothing about (the request returns without delivering them).
    """

    contents: dict[str, bytes]
    chunk_size: int = CS

    def __post_init__(self) -> None:
        cs = self.chunk_size
        self.manifest: dict[str, int] = {r: len(b) for r, b in self.contents.items()}
        self.hashes: dict[str, list[bytes]] = {
            r: [chunk_hash(b[i * cs : (i + 1) * cs]) for i in range(chunk_count(len(b), cs))]
            for r, b in self.contents.items()
        }
        self.hot: dict[str, list[int]] = {}
        self.config = b"{}"
        self.calls: list[Call] = []
        self.expected: list[list[bytes | None]] = []
        self.hold: dict[Priority, asyncio.Event] = {}
        self.fail: set[tuple[str, int]] = set()
        self.fail_once: set[tuple[str, int]] = set()
        self.wrong_size: set[tuple[str, int]] = set()
        self.drop: set[tuple[str, int]] = set()
        self.inflight = 0
        self.peak = 0
        self.connected = False

    def chunk(self, resource: str, index: int) -> bytes:
        cs = self.chunk_size
        return self.contents[resource][index * cs : (index + 1) * cs]

    async def connect(self) -> None:
        self.connected = True

    async def close(self) -> None:
        self.connected = False

    async def fetch_run(
        self,
        resource: str,
        start: int,
        count: int,
        priority: Priority | int,
        expected: Sequence[bytes | None],
        deliver: Deliver,
    ) -> None:
        priority = Priority(priority)
        self.calls.append(Call(resource, start, count, priority))
        self.expected.append(list(expected))
        assert len(expected) == count
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            event = self.hold.get(priority)
            if event is not None:
                await event.wait()
            for _ in range(3):  # let other requests start meanwhile
                await asyncio.sleep(0)
            for index in range(start, start + count):
                key = (resource, index)
                if key in self.fail:
                    raise DrafterError(f"{resource} chunk {index} cannot be had")
                if key in self.fail_once:
                    self.fail_once.discard(key)
                    raise DrafterError(f"{resource} chunk {index} failed once")
                if key in self.drop:
                    continue
                data = self.chunk(resource, index)
                if key in self.wrong_size:
                    data = data[:-1]
                deliver(index, memoryview(data), chunk_hash(data))
        finally:
            self.inflight -= 1

    def requested(self, resource: str, index: int) -> list[Priority]:
        """The priorities of the requests that asked for this chunk, in order."""
        return [
            c.priority
            for c in self.calls
            if c.resource == resource and c.start <= index < c.start + c.count
        ]


def as_source(source: FakeSource) -> ChunkSource:
    return source  # mypy: the fake satisfies the protocol


async def until(condition: Callable[[], bool], steps: int = 500) -> None:
    """Yield to the loop until ``condition`` holds (a bounded number of times)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")
