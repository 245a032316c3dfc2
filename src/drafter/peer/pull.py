"""One pool of pull workers: every missing chunk of a VM's devices, fetched in runs of
consecutive chunks (device loop). Pre-copy rounds pull with it; so does the background
pull that keeps a long link full while the VM runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from drafter.chunks import DEVICES
from drafter.device import Device
from drafter.errors import DrafterError
from drafter.peer.summary import PullProgress

PULL_RUN = 16  # consecutive chunks a background request asks for
PASSES = 10  # a chunk fetched elsewhere may have failed: the pull goes over it again

Run = tuple[Device, int, int]  # device, first chunk, chunk count


class PullPool:
    """At most ``workers`` runs in flight at once (the client's window bounds the
    bytes); runs go in :data:`drafter.chunks.DEVICES` order. ``progress`` counts the
    bytes that became local and ``report`` is told after each run of the background
    pull (:meth:`pull_all`)."""

    def __init__(
        self,
        devices: dict[str, Device],
        workers: int,
        progress: PullProgress | None = None,
        report: Callable[[], None] | None = None,
    ) -> None:
        self.devices = devices
        self.workers = max(1, workers)
        self.progress = progress or PullProgress()
        self.report = report or (lambda: None)

    def runs(self) -> asyncio.Queue[Run]:
        """Every missing chunk, as runs of at most PULL_RUN consecutive chunks."""
        queue: asyncio.Queue[Run] = asyncio.Queue()
        for name in DEVICES:
            device = self.devices.get(name)
            if device is None:
                continue
            start = count = 0
            for index in device.missing():
                if count and index == start + count and count < PULL_RUN:
                    count += 1
                    continue
                if count:
                    queue.put_nowait((device, start, count))
                start, count = index, 1
            if count:
                queue.put_nowait((device, start, count))
        return queue

    async def _drain(self, queue: asyncio.Queue[Run], counted: bool) -> None:
        """Workers take runs off ``queue`` until it is empty."""

        async def worker() -> None:
            while True:
                try:
                    device, start, count = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                before = _missing_bytes(device, start, count) if counted else 0
                await device.pull_run(start, count)
                if counted:  # what became local in the run's range, whoever fetched it
                    self.progress.done += before - _missing_bytes(device, start, count)
                    self.report()

        workers = [asyncio.ensure_future(worker()) for _ in range(min(queue.qsize(), self.workers))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()

    async def pull_missing(self) -> None:
        """Fetch every chunk missing now, once (a pre-copy round)."""
        await self._drain(self.runs(), counted=False)

    async def pull_all(self) -> None:
        """Fetch until every chunk is local, counting progress (the background pull).
        A chunk that another fetch (demand, prefetch) failed to get is pulled again, for
        PASSES passes at most; DrafterError then, or at once when one of the pool's own
        fetches fails (its source already tried again through reconnects)."""
        progress = self.progress
        progress.total = sum(d.size for d in self.devices.values())
        progress.done = sum(d.size - d.missing_bytes() for d in self.devices.values())
        self.report()
        for _ in range(PASSES):
            await self._drain(self.runs(), counted=True)
            for device in self.devices.values():
                await device.settle()  # demand and prefetch fetches still on their way
            if self.runs().empty():
                break
        else:
            raise DrafterError(f"chunks stay missing after pulling them {PASSES} times")
        progress.done = progress.total
        progress.finished = time.monotonic()
        self.report()


def _missing_bytes(device: Device, start: int, count: int) -> int:
    """Bytes of chunks ``start`` .. ``start + count - 1`` that are not local."""
    return sum(device.chunk_length(i) for i in range(start, start + count) if not device.local[i])
