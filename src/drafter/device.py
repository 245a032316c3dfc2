"""Devices: each resource of a VM as a chunked, copy-on-write file.

A device has an optional read-only *base* (a byte range of a package) and a local
sparse *overlay* file. Per chunk it knows whether the bytes are still the base's or
live in the overlay; a write copies the rest of its chunk from the base first, then
marks the chunk dirty. The base is never written, so a package stays untouched until
a new one is composed from base plus overlay (see :meth:`Device.copy_to`).

Devices reach the VMM as files through FUSE (:mod:`drafter.devicefs`).
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from drafter.chunks import (
    CHUNK_SIZE,
    PAGE,
    ZERO_HASH,
    ChunkData,
    ChunkSource,
    Priority,
    chunk_count,
    chunk_length,
    chunk_span,
)
from drafter.errors import DrafterError
from drafter.hashes import proof_tag

# Takes bytes copied to (destination offset, bytes) and writes them: see copy_sparse.
Sink = Callable[[int, bytes], None]
SINK_PIECE = 1 << 20

__all__ = ["CHUNK_SIZE", "Device", "FileRange", "MissingChunkError", "Priority", "copy_sparse"]


class MissingChunkError(DrafterError):
    """A chunk was used before it was fetched from the device's remote source."""

    def __init__(self, device: str, index: int) -> None:
        super().__init__(f"device {device}: chunk {index} is not local yet")


@dataclass(frozen=True)
class FileRange:
    """``size`` bytes of ``path`` from ``offset``: a resource that is a plain file."""

    path: Path
    offset: int
    size: int

    @classmethod
    def whole(cls, path: Path) -> FileRange:
        if not Path(path).is_file():
            raise DrafterError(f"{path} does not exist")
        return cls(Path(path), 0, Path(path).stat().st_size)

    def copy_to(self, dst_fd: int, dst_offset: int, sink: Sink | None = None) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            copy_sparse(fd, self.offset, self.size, dst_fd, dst_offset, sink)
        finally:
            os.close(fd)


class Device:
    """One resource: base range + overlay, chunk by chunk.

    With a ``source`` (a :class:`drafter.chunks.ChunkSource`) a chunk that is not in
    the overlay is *missing* and must be fetched (:meth:`ensure`) before it is read or
    partly written. Fetching runs on the event loop that serves the device (the device
    loop); reads, writes and changes of the chunk map take a lock, since the
    page-cache stores and the hashing of a migration source read chunks from worker
    threads (the fetch bookkeeping only runs on the device loop).
    """

    def __init__(
        self,
        name: str,
        size: int,
        base: FileRange | None,
        overlay: Path,
        writable: bool = True,
        chunk_size: int = CHUNK_SIZE,
        source: ChunkSource | None = None,
    ) -> None:
        if base is not None and base.size != size:
            raise DrafterError(f"device {name}: base holds {base.size} bytes, not {size}")
        self.name = name
        self.size = size
        self.base = base
        self.writable = writable
        self.chunk_size = chunk_size
        self.chunks = chunk_count(size, chunk_size)
        self.local = bytearray(self.chunks)  # 1: the chunk lives in the overlay
        self.dirty: set[int] = set()  # chunks written since the last sync point
        # The pages of them written (a migration's switch-over sends only those); a
        # chunk size that is not a whole number of pages is tracked whole.
        self.page = PAGE if chunk_size % PAGE == 0 else chunk_size
        self.dirty_pages: dict[int, int] = {}  # chunk -> bit mask of its pages
        # Chunks changed since the last checkpoint took them, each with the mask of its
        # pages written (None: no checkpoints); apart from ``dirty``, which a migration
        # takes.
        self.unsaved: dict[int, int] | None = None
        self._lock = threading.Lock()
        self._base_fd = os.open(base.path, os.O_RDONLY | os.O_CLOEXEC) if base else -1
        self.overlay = overlay
        self._overlay_fd = os.open(overlay, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._overlay_fd, size)
        self.source = source  # where missing chunks come from (None: nothing is missing)
        self._inflight: dict[int, tuple[Priority, asyncio.Future[None]]] = {}
        self.fetched_bytes = 0
        self.first_demand_at: float | None = None  # monotonic: a chunk fetched on demand
        # The content hash of each chunk where it is known (from the remote's manifest
        # or the chunk's verified fetch); None once the chunk changed here.
        self.hashes: list[bytes | None] = [None] * self.chunks
        self.binding = True  # whether a fetched chunk must match self.hashes
        # Chunks read since recording started, in the order of their first read (what
        # a resumed VM touches first).
        self.recording: dict[int, None] | None = None
        # A migration's proof of possession (destination, from the grant until done): the
        # nonce and, for each chunk the VM wrote since, its tag taken just before.
        self.proof_nonce: bytes | None = None
        self.proof_tags: dict[int, bytes] = {}

    def expect(self, hashes: list[bytes], binding: bool = True) -> None:
        """The remote's hash of every chunk; all-zero chunks become local at once.

        ``binding``: a fetched chunk must have this hash (a package at rest). A running
        VM's chunks change after they were hashed (dirty lists say which), so there
        the hashes only say what is zero and what a local copy may be reused for.
        """
        if len(hashes) != self.chunks:
            raise DrafterError(f"device {self.name}: {len(hashes)} hashes for {self.chunks} chunks")
        self.binding = binding
        with self._lock:
            for index, h in enumerate(hashes):
                if self.local[index]:
                    continue
                self.hashes[index] = h
                if h == ZERO_HASH:  # the overlay is sparse: its bytes are zeros already
                    self.local[index] = 1

    def fill(self, index: int, data: bytes, digest: bytes | None) -> None:
        """Chunk ``index`` is ``data`` (found elsewhere on this host with the same hash,
        or sent with a migration's state: ``digest`` None, hashed when needed)."""
        with self._lock:
            if self.local[index]:
                return
            if len(data) != self.chunk_length(index):
                raise DrafterError(f"device {self.name}: chunk {index} of a wrong size")
            os.pwrite(self._overlay_fd, data, index * self.chunk_size)
            self.local[index] = 1
            self.hashes[index] = digest

    # -- remote source -----------------------------------------------------------

    def missing(self) -> list[int]:
        """Chunks still to fetch (none without a remote source)."""
        if self.source is None:
            return []
        with self._lock:
            return [i for i in range(self.chunks) if not self.local[i]]

    def missing_bytes(self) -> int:
        return sum(self.chunk_length(i) for i in self.missing())

    def chunk_length(self, index: int) -> int:
        """Bytes in chunk ``index`` (the last one may be short)."""
        return chunk_length(self.size, self.chunk_size, index)

    async def ensure_chunk(self, index: int, priority: Priority) -> None:
        """Make chunk ``index`` local, fetching it once however many ask (a demand for a
        chunk that is only being prefetched is fetched again, ahead of the prefetches)."""
        future = self._fetching(index, priority)
        if future is not None:
            await self._arrival(index, future)

    async def _arrival(self, index: int, future: asyncio.Future[None]) -> None:
        """Wait for the fetch that brings chunk ``index``; a run that failed for another
        of its chunks is no failure for this one once it is local."""
        try:
            await asyncio.shield(future)
        except DrafterError:
            if not self.local[index]:
                raise

    def _fetching(self, index: int, priority: Priority) -> asyncio.Future[None] | None:
        """The fetch of chunk ``index`` that serves ``priority``, registered as in flight
        at once (so that a fetch asked for in the same loop step finds it); None if
        the chunk is local."""
        if self.source is None or self.local[index]:
            return None
        inflight = self._inflight.get(index)
        future: asyncio.Future[None]
        if inflight is None or (priority == Priority.DEMAND and inflight[0] != Priority.DEMAND):
            future = asyncio.ensure_future(self._fetch(index, priority))
            self._inflight[index] = (priority, future)

            def done(f: asyncio.Future[None]) -> None:
                if self._inflight.get(index, (None, None))[1] is f:
                    del self._inflight[index]

            future.add_done_callback(done)
        else:
            future = inflight[1]
        return future

    async def ensure_runs(self, indices: list[int], priority: Priority, max_run: int) -> None:
        """Make chunks ``indices`` local, in that order, with one request per run of
        them that follow each other in the list and on the device (at most
        ``max_run`` chunks): a whole device or a hot set is a few large requests, not
        one per chunk, which an object store answers far faster. Each chunk is in
        flight at once, so a fetch of it asked for meanwhile waits for its run (a
        demand overtakes a prefetch, as with :meth:`ensure_chunk`)."""
        if self.source is None:
            return
        waits: list[tuple[int, asyncio.Future[None]]] = []
        run: list[int] = []
        seen: set[int] = set()

        def flush() -> None:
            if run:
                future = self._fetching_run(run[0], len(run), priority)
                waits.extend((index, future) for index in run)
                run.clear()

        for index in indices:
            if self.local[index] or index in seen:
                continue
            seen.add(index)
            inflight = self._inflight.get(index)
            if inflight is not None and (
                priority != Priority.DEMAND or inflight[0] == Priority.DEMAND
            ):
                flush()
                waits.append((index, inflight[1]))
                continue
            if run and (index != run[-1] + 1 or len(run) >= max_run):
                flush()
            run.append(index)
        flush()
        if waits:
            await asyncio.gather(*(self._arrival(index, future) for index, future in waits))

    def _fetching_run(self, start: int, count: int, priority: Priority) -> asyncio.Future[None]:
        """One fetch of chunks ``start`` .. ``start + count - 1``, registered as in
        flight for each of them."""
        future = asyncio.ensure_future(self._fetch_run(start, count, priority))
        for index in range(start, start + count):
            self._inflight[index] = (priority, future)

        def done(f: asyncio.Future[None]) -> None:
            for index in range(start, start + count):
                if self._inflight.get(index, (None, None))[1] is f:
                    del self._inflight[index]

        future.add_done_callback(done)
        return future

    async def _fetch_run(self, start: int, count: int, priority: Priority) -> None:
        """Chunks ``start`` .. ``start + count - 1`` in one request; if it fails, each
        one still missing on its own, so one bad chunk fails only itself (its
        waiters, :meth:`_arrival`), not its neighbours."""
        assert self.source is not None
        expected = [self.hashes[i] if self.binding else None for i in range(start, start + count)]
        try:
            await self.source.fetch_run(self.name, start, count, priority, expected, self._store)
        except DrafterError:
            missing = [i for i in range(start, start + count) if not self.local[i]]
            if count == 1 or not missing:
                if missing:
                    raise
                return  # other fetches got them
            failures = [
                r
                for r in await asyncio.gather(
                    *(self._fetch(i, priority) for i in missing), return_exceptions=True
                )
                if isinstance(r, BaseException)
            ]
            if failures:
                raise failures[0] from None
            return
        if priority == Priority.DEMAND and self.first_demand_at is None:
            self.first_demand_at = time.monotonic()

    async def _fetch(self, index: int, priority: Priority) -> None:
        assert self.source is not None
        expected = self.hashes[index] if self.binding else None
        try:
            await self.source.fetch_run(self.name, index, 1, priority, [expected], self._store)
        except DrafterError:
            if self.local[index]:  # another fetch of it (a background run) got it
                return
            raise
        if priority == Priority.DEMAND and self.first_demand_at is None:
            self.first_demand_at = time.monotonic()

    async def settle(self) -> None:
        """Wait for every fetch on its way (their failures are their callers')."""
        while self._inflight:
            futures = [future for _, future in list(self._inflight.values())]
            await asyncio.gather(*futures, return_exceptions=True)

    def recorded(self) -> list[int]:
        """The chunks read since recording started, so far, in first-read order."""
        with self._lock:
            return list(self.recording or {})

    def stop_recording(self) -> list[int]:
        """Stop recording reads; the chunks read since it started, in first-read order."""
        with self._lock:
            touched, self.recording = self.recording or {}, None
        return list(touched)

    def _store(self, index: int, data: ChunkData, digest: bytes) -> None:
        """A verified chunk arrived: keep it unless the chunk became local meanwhile."""
        if len(data) != self.chunk_length(index):
            raise DrafterError(f"device {self.name}: chunk {index} arrived with a wrong size")
        with self._lock:
            if not self.local[index]:  # a whole-chunk write may have landed meanwhile
                os.pwrite(self._overlay_fd, data, index * self.chunk_size)
                self.local[index] = 1
                self.hashes[index] = digest
                self.fetched_bytes += len(data)

    async def pull_run(self, start: int, count: int) -> None:
        """Background: chunks ``start`` .. ``start + count - 1`` that are neither local
        nor already on their way, with one request per stretch of them."""
        stretches: list[list[int]] = []
        for index in range(start, start + count):
            if self.local[index] or index in self._inflight:
                continue
            if stretches and stretches[-1][-1] == index - 1:
                stretches[-1].append(index)
            else:
                stretches.append([index])
        if not stretches or self.source is None:
            return
        fetches = []
        for stretch in stretches:
            expected = [self.hashes[i] if self.binding else None for i in stretch]
            fetches.append(
                self.source.fetch_run(
                    self.name, stretch[0], len(stretch), Priority.BACKGROUND, expected,
                    self._store,
                )
            )  # fmt: skip
        await asyncio.gather(*fetches)

    async def ensure(
        self, offset: int, size: int, priority: Priority, partial_only: bool = False
    ) -> None:
        """Fetch the chunks under ``[offset, offset+size)``; with ``partial_only`` just the
        ones the range does not cover whole (what a write needs)."""
        if self.source is None or size <= 0:
            return
        waits = []
        for index in chunk_span(offset, min(offset + size, self.size) - offset, self.chunk_size):
            start = index * self.chunk_size
            whole = offset <= start and offset + size >= start + self.chunk_length(index)
            if partial_only and whole and self.proof_nonce is None:
                continue  # (while proving, the source's bytes are needed before a write)
            future = self._fetching(index, priority)
            if future is not None:
                waits.append(self._arrival(index, future))
        if waits:
            await asyncio.gather(*waits)

    def close(self) -> None:
        for fd in (self._base_fd, self._overlay_fd):
            if fd >= 0:
                os.close(fd)
        self._base_fd = self._overlay_fd = -1

    def _read_base(self, offset: int, size: int) -> bytes:
        if self.base is None:
            return bytes(size)
        data = os.pread(self._base_fd, size, self.base.offset + offset)
        return data + bytes(size - len(data))

    def read(self, offset: int, size: int) -> bytes:
        """Bytes at ``offset``; short only at the end of the device."""
        size = max(0, min(size, self.size - offset))
        out = bytearray()
        with self._lock:
            if self.recording is not None:
                self.recording.update(dict.fromkeys(chunk_span(offset, size, self.chunk_size)))
            pos = offset
            end = offset + size
            while pos < end:
                index = pos // self.chunk_size
                # Extend over following chunks of the same kind: fewer syscalls.
                kind = self.local[index]
                stop = index + 1
                while stop < self.chunks and self.local[stop] == kind:
                    stop += 1
                run_end = min(end, stop * self.chunk_size)
                if kind:
                    out += os.pread(self._overlay_fd, run_end - pos, pos)
                elif self.source is not None:
                    raise MissingChunkError(self.name, index)  # never hand out guesses
                else:
                    out += self._read_base(pos, run_end - pos)
                pos = run_end
        return bytes(out)

    def read_chunk(self, index: int) -> tuple[bytes, bytes | None]:
        """Chunk ``index`` (local) and its hash if known, read together."""
        with self._lock:
            start = index * self.chunk_size
            length = self.chunk_length(index)
            if not self.local[index]:
                if self.source is not None:
                    raise MissingChunkError(self.name, index)
                data = self._read_base(start, length)
            else:
                data = os.pread(self._overlay_fd, length, start)
            return data, self.hashes[index]

    def write(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise PermissionError(f"device {self.name} is read-only")
        if offset + len(data) > self.size:
            raise ValueError("write beyond the end of the device")
        span = chunk_span(offset, len(data), self.chunk_size)
        with self._lock:
            if self.source is not None:  # nothing changes unless every chunk can take it
                for index in span:
                    if not self.local[index] and (
                        self.proof_nonce is not None or not self._covers(index, offset, len(data))
                    ):
                        raise MissingChunkError(self.name, index)
            if self.proof_nonce is not None:
                for index in span:
                    if index not in self.proof_tags:
                        self.proof_tags[index] = self._tag(self.proof_nonce, index)
            for index in span:
                if not self.local[index]:
                    start = index * self.chunk_size
                    length = self.chunk_length(index)
                    covered = self._covers(index, offset, len(data))
                    if not covered and self.base is not None:
                        os.pwrite(self._overlay_fd, self._read_base(start, length), start)
                    self.local[index] = 1
                self.dirty.add(index)
                self.hashes[index] = None
            if data:
                page, chunk = self.page, self.chunk_size
                for index in span:
                    lo = max(offset, index * chunk) - index * chunk
                    hi = min(offset + len(data), (index + 1) * chunk) - index * chunk
                    mask = ((1 << ((hi - 1) // page + 1)) - 1) ^ ((1 << (lo // page)) - 1)
                    self.dirty_pages[index] = self.dirty_pages.get(index, 0) | mask
                    if self.unsaved is not None:
                        self.unsaved[index] = self.unsaved.get(index, 0) | mask
            os.pwrite(self._overlay_fd, data, offset)
        return len(data)

    def start_proof(self, nonce: bytes) -> None:
        """A migration's grant: from now on each chunk's tag over ``nonce`` and its bytes
        as they are now is kept, taken just before the VM first writes it, so that the
        source can check later that this host held its bytes (:meth:`proof_tag`)."""
        with self._lock:
            self.proof_nonce = nonce
            self.proof_tags = {}

    def stop_proof(self) -> None:
        with self._lock:
            self.proof_nonce = None
            self.proof_tags = {}

    def proof_tag(self, index: int) -> bytes:
        """Chunk ``index``'s tag as of :meth:`start_proof`; MissingChunkError if this host
        never held it."""
        with self._lock:
            if self.proof_nonce is None:
                raise DrafterError(f"device {self.name}: no proof under way")
            tag = self.proof_tags.get(index)
            if tag is not None:
                return tag
            if not self.local[index]:
                raise MissingChunkError(self.name, index)
            return self._tag(self.proof_nonce, index)

    def _tag(self, nonce: bytes, index: int) -> bytes:
        start = index * self.chunk_size
        data = os.pread(self._overlay_fd, self.chunk_length(index), start)
        return proof_tag(nonce, data)

    def _covers(self, index: int, offset: int, size: int) -> bool:
        """Whether ``[offset, offset+size)`` covers chunk ``index`` whole."""
        start = index * self.chunk_size
        return offset <= start and offset + size >= start + self.chunk_length(index)

    def invalidate(self, indices: list[int]) -> None:
        """Forget local copies of these chunks: they changed at the remote (migration).
        Only while nothing uses them (no fetch in flight, the VM not started)."""
        if self.source is None:
            raise DrafterError(f"device {self.name} has no remote to fetch chunks again from")
        with self._lock:
            for index in indices:
                if not 0 <= index < self.chunks:
                    raise DrafterError(f"device {self.name}: no chunk {index}")
                if self.local[index]:
                    self.local[index] = 0
                    self.dirty.discard(index)
                    self.dirty_pages.pop(index, None)
                self.hashes[index] = None

    def take_dirty(self) -> set[int]:
        """The chunks written since the last call (a sync point), and reset."""
        with self._lock:
            dirty, self.dirty = self.dirty, set()
            self.dirty_pages = {}
        return dirty

    def read_unsaved(self, index: int) -> tuple[bytes, int]:
        """Chunk ``index`` (local) and, read together with it, the mask of its pages
        written since the last :meth:`take_unsaved` (bytes read after a take may hold
        writes the take did not see: a checkpoint must count those pages too)."""
        with self._lock:
            start, length = index * self.chunk_size, self.chunk_length(index)
            if self.local[index]:
                data = os.pread(self._overlay_fd, length, start)
            elif self.source is not None:
                raise MissingChunkError(self.name, index)
            else:
                data = self._read_base(start, length)
            return data, (self.unsaved or {}).get(index, 0)

    def page_mask(self, index: int) -> int:
        """The mask of every page of chunk ``index``."""
        return (1 << -(-self.chunk_length(index) // self.page)) - 1

    def track_unsaved(self) -> None:
        """Checkpoints from now on: every chunk counts as changed (whole) until one
        takes it."""
        with self._lock:
            self.unsaved = {index: self.page_mask(index) for index in range(self.chunks)}

    def take_unsaved(self) -> dict[int, int]:
        """The chunks changed since the last call (a checkpoint reads them), each with
        the mask of its pages written; and reset."""
        with self._lock:
            if self.unsaved is None:
                raise DrafterError(f"device {self.name} does not track checkpoints")
            taken, self.unsaved = self.unsaved, {}
        return taken

    def give_back_unsaved(self, chunks: dict[int, int]) -> None:
        """A checkpoint that took these failed: they count as changed again."""
        with self._lock:
            if self.unsaved is not None:
                for index, mask in chunks.items():
                    self.unsaved[index] = self.unsaved.get(index, 0) | mask

    def take_dirty_runs(self) -> dict[int, list[tuple[int, int]]]:
        """The chunks written since the last sync point, each with the runs of bytes
        written in it ((offset in the chunk, length), in order, whole pages); reset."""
        with self._lock:
            dirty, self.dirty = self.dirty, set()
            pages, self.dirty_pages = self.dirty_pages, {}
        runs: dict[int, list[tuple[int, int]]] = {}
        for index in sorted(dirty):
            length = self.chunk_length(index)
            count = -(-length // self.page)
            mask = pages.get(index, (1 << count) - 1)
            chunk_runs: list[tuple[int, int]] = []
            for p in (p for p in range(count) if mask >> p & 1):
                start = p * self.page
                end = min(length, start + self.page)
                if chunk_runs and chunk_runs[-1][0] + chunk_runs[-1][1] == start:
                    chunk_runs[-1] = (chunk_runs[-1][0], end - chunk_runs[-1][0])
                else:
                    chunk_runs.append((start, end - start))
            runs[index] = chunk_runs
        return runs

    def read_runs(self, index: int, runs: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
        """The bytes of chunk ``index`` (local) in these runs ((offset in it, length))."""
        with self._lock:
            if not self.local[index]:
                raise MissingChunkError(self.name, index)
            start = index * self.chunk_size
            return [(offset, os.pread(self._overlay_fd, n, start + offset)) for offset, n in runs]

    def patch(self, index: int, runs: list[tuple[int, bytes]]) -> None:
        """Chunk ``index`` (local) changed at the remote in these runs only ((offset in
        the chunk, bytes)): write them (a migration's last dirty pages)."""
        with self._lock:
            if not self.local[index]:
                raise MissingChunkError(self.name, index)
            if any(offset < 0 or offset + len(data) > self.chunk_length(index)
                   for offset, data in runs):  # fmt: skip
                raise DrafterError(f"device {self.name}: a patch beyond chunk {index}")
            for offset, data in runs:
                os.pwrite(self._overlay_fd, data, index * self.chunk_size + offset)
            self.hashes[index] = None
            if self.unsaved is not None:
                mask = self.unsaved.get(index, 0)
                for offset, data in runs:
                    if data:
                        first, last = offset // self.page, (offset + len(data) - 1) // self.page
                        mask |= ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
                self.unsaved[index] = mask

    def copy_to(self, dst_fd: int, dst_offset: int, sink: Sink | None = None) -> None:
        """Write the device's current bytes to ``dst_fd`` at ``dst_offset``, keeping
        holes (through ``sink``, in ascending order, when one is given)."""
        with self._lock:
            index = 0
            while index < self.chunks:
                kind = self.local[index]
                stop = index + 1
                while stop < self.chunks and self.local[stop] == kind:
                    stop += 1
                start = index * self.chunk_size
                length = min(stop * self.chunk_size, self.size) - start
                if kind:
                    copy_sparse(self._overlay_fd, start, length, dst_fd, dst_offset + start, sink)
                elif self.base is not None:
                    copy_sparse(
                        self._base_fd,
                        self.base.offset + start,
                        length,
                        dst_fd,
                        dst_offset + start,
                        sink,
                    )
                index = stop


def copy_sparse(
    src_fd: int,
    src_offset: int,
    size: int,
    dst_fd: int,
    dst_offset: int,
    sink: Sink | None = None,
) -> None:
    """Copy ``size`` bytes, skipping holes in the source (they stay holes). With a
    ``sink`` the bytes pass through it instead (read once, in ascending order, at most
    :data:`SINK_PIECE` at a time): it writes them and may look at them on the way."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(src_fd, src_offset + pos, os.SEEK_DATA) - src_offset
        except OSError:  # ENXIO: only a hole remains
            return
        if data >= size:
            return
        hole = min(os.lseek(src_fd, src_offset + data, os.SEEK_HOLE) - src_offset, size)
        n = data
        while sink is not None and n < hole:
            piece = os.pread(src_fd, min(hole - n, SINK_PIECE), src_offset + n)
            if not piece:
                raise DrafterError("short read while copying a resource")
            sink(dst_offset + n, piece)
            n += len(piece)
        while n < hole:
            chunk = min(hole - n, 8 << 20)
            done = _copy_range(src_fd, dst_fd, chunk, src_offset + n, dst_offset + n)
            if done == 0:
                raise DrafterError("short read while copying a resource")
            n += done
        pos = hole


def _copy_range(src_fd: int, dst_fd: int, size: int, src_off: int, dst_off: int) -> int:
    """copy_file_range, or read and write where the kernel cannot (across file systems)."""
    try:
        return os.copy_file_range(src_fd, dst_fd, size, src_off, dst_off)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(src_fd, min(size, 1 << 20), src_off)
    return os.pwrite(dst_fd, data, dst_off) if data else 0
