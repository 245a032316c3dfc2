"""A committed checkpoint generation as a :class:`~drafter.chunks.ChunkSource`: the
VM resumes from it lazily, exactly as from a package in the store.

The generation's manifest (:mod:`drafter.checkpoint.manifest`) lists every chunk's
hash; a chunk is the object ``chunks/<hash>``, fetched with one GET, or a patch (a
range of the generation's pack) applied to such a whole chunk (or to zeros); either
way checked for its length and against its hash before it is handed on; all-zero
chunks are never fetched. At most :data:`INFLIGHT` requests are in flight, waiters in priority order
(demand, prefetch, background). As with a package (:class:`ObjectSource`), once the
VM runs (``keep_trying``) a store that stays away stalls a fetch, which tries again
with backoff, rather than failing the running VM's reads; a missing chunk or bytes
that fail verification fail at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from drafter.checkpoint.manifest import Manifest, chunk_name, patch_pages
from drafter.checkpoint.records import Records
from drafter.chunks import FETCHED, ZERO_HASH, Deliver, Priority, chunk_length
from drafter.errors import DrafterError
from drafter.hashes import digest
from drafter.objects.slots import CEILING, RequestSlots
from drafter.objects.source import OUTAGE_BACKOFF, StoreError, check_run
from drafter.transport.inflight import ClientStats, VerificationError

if TYPE_CHECKING:
    from drafter.metrics import Metrics

log = logging.getLogger(__name__)

INFLIGHT = 64  # chunk GETs in flight (each one chunk: many, to fill the link)


class CheckpointSource:
    """One generation of ``records`` (its ``manifest``, already read and checked)."""

    def __init__(self, records: Records, manifest: Manifest, inflight: int = INFLIGHT) -> None:
        self.records = records
        self.generation = manifest
        self.raddr = f"{records.where} (generation {manifest.generation})"
        self._slots = RequestSlots(inflight, budget=CEILING)  # one chunk per request
        self._closed = False
        self.chunk_size = manifest.chunk_size
        self.manifest: dict[str, int] = dict(manifest.sizes)
        self.hashes: dict[str, list[bytes]] = manifest.hashes
        self.hot: dict[str, list[int]] = manifest.hot
        self.patches = manifest.patches
        self.config = manifest.config
        self.stats = ClientStats()
        self.metrics: Metrics | None = None
        self.requests = 0
        self.keep_trying = False
        self.outages = 0
        self.cache = None

    @property
    def reconnects(self) -> int:
        return 0

    async def connect(self) -> None:
        """The manifest was read and checked before: nothing more to learn."""
        if set(self.manifest) != set(FETCHED):
            raise DrafterError(f"{self.raddr} does not list every resource")

    async def fetch_run(
        self,
        resource: str,
        start: int,
        count: int,
        priority: Priority | int,
        expected: Sequence[bytes | None],
        deliver: Deliver,
    ) -> None:
        """Chunks ``start`` .. ``start + count - 1`` of ``resource``, verified and
        handed to ``deliver`` in order (fetched concurrently)."""
        if self._closed:
            raise DrafterError(f"{self.raddr} is closed")
        hashes = check_run(self.raddr, self.hashes, resource, start, count, expected)
        size = self.manifest[resource]
        fetches = {
            index: asyncio.ensure_future(self._fetch(resource, index, int(priority)))
            for index in range(start, start + count)
            if hashes[index] != ZERO_HASH
        }
        try:
            for index in range(start, start + count):
                fetch = fetches.get(index)
                if fetch is None:
                    self.stats.zero_chunks += 1
                    deliver(index, bytes(chunk_length(size, self.chunk_size, index)), ZERO_HASH)
                else:
                    deliver(index, await fetch, hashes[index])
        finally:
            for fetch in fetches.values():
                if not fetch.done():
                    fetch.cancel()
            for fetch in fetches.values():
                if fetch.done() and not fetch.cancelled():
                    fetch.exception()  # retrieved: the first one raised above

    async def _fetch(self, resource: str, index: int, priority: int) -> bytes:
        want = self.hashes[resource][index]
        n = chunk_length(self.manifest[resource], self.chunk_size, index)
        patch = self.patches.get(resource, {}).get(index)
        sent = time.monotonic()
        async with self._slots.slot(priority, n):
            if patch is None:
                data = await self._get(chunk_name(want), n)
            elif patch.base == ZERO_HASH:
                data = bytes(n)
            else:
                data = await self._get(chunk_name(patch.base), n)
                if data is not None and (len(data) != n or digest(data) != patch.base):
                    self.stats.verify_failures += 1
                    raise VerificationError(
                        f"the base of chunk {index} of {resource} from {self.raddr} failed "
                        "verification: refused it"
                    )
            if patch is not None and data is not None:
                whole = bytearray(data)
                for link in patch.links:  # in order: a later link's pages are newer
                    pages = await self._get_range(link.pack, link.offset, link.length)
                    if pages is None:
                        raise StoreError(f"{self.raddr}: {link.pack} is missing", lasting=True)
                    at = 0
                    for start, length in patch_pages(link.mask, n):
                        whole[start : start + length] = pages[at : at + length]
                        at += length
                data = bytes(whole)
        if data is None:
            raise StoreError(
                f"{self.raddr}: chunk {index} of {resource} is missing from the store",
                lasting=True,
            )
        if len(data) != n or digest(data) != want:
            self.stats.verify_failures += 1
            raise VerificationError(
                f"chunk {index} of {resource} from {self.raddr} failed verification "
                "(its bytes do not match the manifest): refused it"
            )
        self.stats.chunks += 1
        self.stats.bytes += n
        self.stats.wire_bytes += n
        if self.metrics is not None:
            self.metrics.chunk_pulled(resource, priority, n, n, time.monotonic() - sent)
        return data

    async def _get(self, name: str, limit: int) -> bytes | None:
        """One object, at most ``limit`` bytes."""
        return await self._waiting(lambda: self.records.get(name, limit))

    async def _get_range(self, name: str, offset: int, length: int) -> bytes | None:
        """A range of a pack."""
        return await self._waiting(lambda: self.records.get_range(name, offset, length))

    async def _waiting(self, call: Callable[[], Awaitable[bytes | None]]) -> bytes | None:
        """``call``; a store that stays away is waited for, with backoff, once the VM
        runs (``keep_trying``); a lasting refusal fails at once."""
        wait = OUTAGE_BACKOFF[0]
        while True:
            if self._closed:
                raise DrafterError(f"{self.raddr} is closed")
            self.requests += 1
            try:
                return await call()
            except StoreError as e:
                if e.lasting or not self.keep_trying:
                    raise
                if wait == OUTAGE_BACKOFF[0]:
                    self.outages += 1
                    log.warning("%s; the VM runs on the chunks it has, retrying", e)
                await asyncio.sleep(wait)
                wait = min(wait * 2, OUTAGE_BACKOFF[1])

    async def close(self) -> None:
        self._closed = True
