"""A package in object storage served over the project's wire protocol: the
:class:`~drafter.transport.server.ChunkProvider` behind ``drafter-registry
--package-path s3://...`` (or ``http(s)://``).

Everything a client is told comes from the package's verified index (sizes, chunk
hashes, the hot set): nothing is hashed at start. A chunk a client asks for is read
with the chunks after it, one range request per stretch (:data:`READ_AHEAD` chunks
ahead are kept in flight or held), since clients ask a chunk at a time per connection
and a store's round trip is long beside a disk read. What is read is held in a bounded
memory cache (:data:`HELD_BYTES`), oldest dropped first, until a client takes it.
Every chunk is verified against the index by the
:class:`~drafter.objects.source.ObjectSource` before it is held. A store outage
stalls the requests (the source keeps trying); a replaced object, a refused
credential or a chunk that fails verification fails them, and the clients see the
error.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from drafter.chunks import ZERO_HASH, Priority, chunk_length
from drafter.errors import DrafterError
from drafter.objects.source import ObjectSource

log = logging.getLogger(__name__)

READ_AHEAD = 32  # chunks past the asked one kept in flight or held (8 MiB at 256 KiB)
HELD_BYTES = 256 << 20  # the most chunk bytes held for clients at once

_Key = tuple[str, int]


class ObjectProvider:
    """An :class:`ObjectSource` (connected) as a registry's chunk provider."""

    def __init__(
        self, source: ObjectSource, read_ahead: int = READ_AHEAD, held_bytes: int = HELD_BYTES
    ) -> None:
        if not source.chunk_size:
            raise DrafterError(f"{source.raddr} is not open")
        self.source = source
        self.chunk_size = source.chunk_size
        self.read_ahead = max(0, read_ahead)
        self.held_bytes = held_bytes
        self._held: OrderedDict[_Key, bytes] = OrderedDict()  # oldest first
        self._held_size = 0
        self._pending: dict[_Key, asyncio.Future[bytes]] = {}
        self._runs: set[asyncio.Task[None]] = set()
        self.reads = 0  # chunks clients asked for
        self.hits = 0  # of them, already held or on their way

    def manifest(self) -> dict[str, int]:
        return dict(self.source.manifest)

    def config(self) -> bytes:
        return self.source.config

    async def hashes(self, resource: str) -> list[bytes]:
        return self.source.hashes[resource]

    def hot(self) -> dict[str, list[int]]:
        return {r: list(v) for r, v in self.source.hot.items()}

    async def read_chunk(self, resource: str, index: int) -> tuple[bytes, bytes | None]:
        """Chunk ``index`` of ``resource``, verified, with its hash from the index."""
        hashes = self.source.hashes.get(resource)
        if hashes is None or not 0 <= index < len(hashes):
            raise DrafterError(f"chunk {index} is not in {resource}")
        digest = hashes[index]
        if digest == ZERO_HASH:
            return bytes(
                chunk_length(self.source.manifest[resource], self.chunk_size, index)
            ), digest
        self.reads += 1
        key = (resource, index)
        data = self._held.pop(key, None)
        if data is not None:
            self._held_size -= len(data)
            self.hits += 1
            self._read_ahead(resource, index + 1)
            return data, digest
        waiting = self._pending.get(key)
        if waiting is not None:
            self.hits += 1
        else:
            self._read_ahead(resource, index)
            waiting = self._pending[key]
        self._read_ahead(resource, index + 1)
        data = await asyncio.shield(waiting)
        self._drop(key)  # taken: a second client of the same chunk reads it again
        return data, digest

    def _read_ahead(self, resource: str, start: int) -> None:
        """Runs of chunks ``start`` .. ``start + read_ahead`` that are neither held nor
        on their way: each asked for with one fetch (zero chunks need none)."""
        hashes = self.source.hashes[resource]
        stop = min(len(hashes), start + max(1, self.read_ahead))
        index = start
        while index < stop:
            if self._known(resource, index):
                index += 1
                continue
            end = index
            while end < stop and not self._known(resource, end):
                end += 1
            self._fetch(resource, index, end)
            index = end

    def _known(self, resource: str, index: int) -> bool:
        key = (resource, index)
        zero = self.source.hashes[resource][index] == ZERO_HASH
        return zero or key in self._held or key in self._pending

    def _fetch(self, resource: str, start: int, end: int) -> None:
        loop = asyncio.get_running_loop()
        hashes = self.source.hashes[resource]
        futures = {i: loop.create_future() for i in range(start, end) if hashes[i] != ZERO_HASH}
        for i, future in futures.items():
            self._pending[(resource, i)] = future

        def deliver(index: int, data: object, digest: bytes) -> None:
            future = futures.get(index)
            if future is None or future.done():
                return
            chunk = bytes(data)  # type: ignore[call-overload]
            future.set_result(chunk)
            self._hold((resource, index), chunk)

        async def run() -> None:
            try:
                count = end - start
                await self.source.fetch_run(
                    resource, start, count, Priority.DEMAND, [None] * count, deliver
                )
            except BaseException as e:
                error = e if isinstance(e, Exception) else DrafterError(f"{resource} read stopped")
                for future in futures.values():
                    if not future.done():
                        future.set_exception(error)
                        future.exception()  # retrieved here: a waiter may never come
                if not isinstance(e, Exception):
                    raise
            finally:
                for i, future in futures.items():
                    if self._pending.get((resource, i)) is future:
                        del self._pending[(resource, i)]

        task = asyncio.ensure_future(run())
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)

    def _hold(self, key: _Key, data: bytes) -> None:
        self._drop(key)
        self._held[key] = data
        self._held_size += len(data)
        while self._held_size > self.held_bytes and self._held:
            _, old = self._held.popitem(last=False)
            self._held_size -= len(old)

    def _drop(self, key: _Key) -> None:
        data = self._held.pop(key, None)
        if data is not None:
            self._held_size -= len(data)

    async def close(self) -> None:
        """Stop every read in flight and let the store go."""
        for task in list(self._runs):
            task.cancel()
        await asyncio.gather(*self._runs, return_exceptions=True)
        self._held.clear()
        self._held_size = 0
        await self.source.close()
