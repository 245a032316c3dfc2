"""The destination's page cache during a migration: what of the devices the kernel
caches for QEMU, kept never older than the devices (device loop).

During pre-copy the source's hot set is stored into the page cache of the device
files (FUSE ``notify_store``), so that the VM, once it runs here, finds the chunks it
touches first without a FUSE read each. A cached chunk that the source changes
afterwards is stored again once it is pulled again; at switch-over the last dirty
pages are patched in. Whatever cannot be kept exact, the whole cache goes (FUSE
cannot drop a part of it), and the VM reads through FUSE instead: slower, never stale.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from drafter.chunks import TRACKED
from drafter.device import Device
from drafter.errors import DrafterError
from drafter.migration.messages import SwitchOver

log = logging.getLogger(__name__)


class PageCache(Protocol):
    """The kernel's page cache of the device files the VMM maps (a
    :class:`drafter.devicefs.DeviceHost`)."""

    async def drop_cache(self, names: list[str]) -> None: ...

    async def store_cache(self, device: Device, indices: list[int]) -> int: ...

    async def store_cache_runs(
        self, device: Device, runs: dict[int, list[tuple[int, bytes]]]
    ) -> None: ...


class CacheMirror:
    """What this host stored into the page cache of the tracked devices, and what of
    it went stale since; each method keeps the cache exact or drops it whole."""

    def __init__(self, tracked: list[Device], cache: PageCache) -> None:
        self.tracked = tracked
        self.cache = cache
        # Chunks in the page cache, per device, in the order they were stored: the hot
        # set, then the final dirty chunks (the next host's hot set starts with them).
        self.cached: dict[str, dict[int, None]] = {d.name: {} for d in tracked}
        # Cached chunks the source changed since they were stored: to store again.
        self.stale: dict[str, set[int]] = {d.name: set() for d in tracked}

    def changed(self, name: str, chunks: list[int]) -> None:
        """These chunks of ``name`` changed at the source (their local copy is gone)."""
        cached = self.cached[name]
        self.stale[name].update(i for i in chunks if i in cached)

    async def warm(self, hot: dict[str, list[int]]) -> None:
        """After the first pull of pre-copy, the VM still running at the source: store
        the chunks it touches first (``hot``) that are here. The cache is emptied
        first: QEMU is up, and nothing it may have read stays. From here on, every
        pull is followed by :meth:`store_stale`."""
        start = time.monotonic()
        await self.cache.drop_cache(list(TRACKED))
        stored = 0
        try:
            for device in self.tracked:
                chunks = [i for i in hot.get(device.name, []) if device.local[i]]
                self.cached[device.name] = dict.fromkeys(chunks)
                self.stale[device.name] = set()
                stored += await self.cache.store_cache(device, chunks)
        except DrafterError as e:
            await self.drop_all(e)
        log.debug(
            "page cache: %d hot chunk(s) stored in %.0f ms",
            stored,
            (time.monotonic() - start) * 1000,
        )

    async def store_stale(self) -> None:
        """Store again the cached chunks that were pulled again since they changed."""
        try:
            for device in self.tracked:
                stale = self.stale[device.name]
                here = sorted(i for i in stale if device.local[i])
                await self.cache.store_cache(device, here)
                stale.difference_update(here)
        except DrafterError as e:
            await self.drop_all(e)

    async def drop_all(self, error: DrafterError) -> None:
        """A store failed: the cache may hold stale pages. It goes whole; the VM reads
        through FUSE instead (slower, never stale)."""
        log.warning("%s; dropping the page cache instead", error)
        await self.cache.drop_cache(list(TRACKED))
        self.cached = {d.name: {} for d in self.tracked}
        self.stale = {d.name: set() for d in self.tracked}

    async def refresh(self, answer: SwitchOver, patched: dict[str, set[int]]) -> None:
        """Switch-over, the VM runs nowhere: the page cache must hold nothing older than
        the devices. A cached chunk that took the last dirty pages gets those pages
        again; another dirty chunk that is here is stored whole. If a cached chunk is
        not here, the whole cache goes and only the chunks that are here are stored."""
        stale = any(not d.local[i] for d in self.tracked for i in self.stale[d.name])
        if stale or not any(self.cached.values()):  # nothing warmed: drop what QEMU read
            await self.cache.drop_cache(list(TRACKED))
            self.cached = {d.name: {} for d in self.tracked}
        try:
            for device in self.tracked:
                cached = self.cached[device.name]
                inline = answer.inline.get(device.name, {})
                pages = {i: inline[i] for i in patched.get(device.name, set()) if i in cached}
                here = [
                    i
                    for i in answer.dirty.get(device.name, [])
                    if device.local[i] and i not in pages
                ]
                cached.update(dict.fromkeys(here))
                await self.cache.store_cache_runs(device, pages)
                await self.cache.store_cache(device, here)
                self.stale[device.name] = set()
        except DrafterError as e:
            await self.drop_all(e)
