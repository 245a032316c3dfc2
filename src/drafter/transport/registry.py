"""Serve a package read-only: a ChunkProvider over a ``.drft`` file.

Chunks are read in place from the package's member ranges with ``os.pread`` on a
read-only descriptor. Every chunk's hash is computed once when the registry starts
(holes are found with ``SEEK_DATA`` and never read); all-zero chunks are then never
read again. The hot set is expanded to chunk indices once, at open, and refused there
if one frame cannot carry it. The package file is never written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from drafter.chunks import RESOURCES, ZERO_HASH, chunk_length, chunk_span
from drafter.errors import DrafterError
from drafter.hashes import file_hashes
from drafter.package import Package
from drafter.transport import protocol as wire

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 256 * 1024


class PackageProvider:
    """The five data resources of a package, chunk by chunk, plus its config bytes."""

    def __init__(self, package: Package, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if chunk_size <= 0:
            raise DrafterError(f"bad chunk size {chunk_size}")
        self.package = package
        self.chunk_size = chunk_size
        self._members = {r: package.members[r] for r in RESOURCES if r != "config"}
        self._config = package.read("config")
        self._hot = self._expand_hot()  # once: every handshake sends the same list
        try:
            self._fd = os.open(package.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DrafterError(f"cannot open {package.path}: {e.strerror or e}") from None
        self._hashes: dict[str, list[bytes]] = {}
        self._hashing: asyncio.Future[None] | None = None  # the first hashes() call's

    def hash_all(self) -> None:
        """Hash every chunk now (blocking; run it in a thread before serving)."""
        start = time.monotonic()
        hashes: dict[str, list[bytes]] = {}  # published whole, never seen half done
        for r, m in self._members.items():
            hashes[r] = file_hashes(self._fd, m.offset, m.size, self.chunk_size)
        self._hashes = hashes
        total = sum(m.size for m in self._members.values())
        log.debug("hashed %d MiB in %.2fs", total >> 20, time.monotonic() - start)

    def manifest(self) -> dict[str, int]:
        """Resource -> size: state, memory, kernel, initramfs, disk."""
        return {r: m.size for r, m in self._members.items()}

    def config(self) -> bytes:
        """The package's config member, byte for byte."""
        return self._config

    async def hashes(self, resource: str) -> list[bytes]:
        """Every chunk's hash of ``resource`` (computed on first use)."""
        if not self._hashes:
            if self._hashing is None:  # clients connecting meanwhile wait for the same run
                self._hashing = asyncio.ensure_future(asyncio.to_thread(self.hash_all))
            await asyncio.shield(self._hashing)
        return self._hashes[resource]

    def hot(self) -> dict[str, list[int]]:
        """The package's hot ranges as chunk indices of this registry's chunk size, in
        the order the VM first touched them (the same object every time)."""
        return self._hot

    def _expand_hot(self) -> dict[str, list[int]]:
        """:meth:`hot`, worked out once at open. DrafterError if the ranges cover more
        chunks (counted range by range, so overlaps too) than one HOT frame holds:
        every client would refuse the frame, and a hostile hot member could make the
        expansion itself cost minutes."""
        out: dict[str, list[int]] = {}
        budget = wire.MAX_HOT_CHUNKS
        for resource, ranges in self.package.hot.items():
            if resource not in self._members:
                continue
            size = self._members[resource].size
            indices: dict[int, None] = {}
            for offset, length in ranges:
                span = chunk_span(offset, min(offset + length, size) - offset, self.chunk_size)
                budget -= len(span)
                if budget < 0:
                    raise DrafterError(
                        f"{self.package.path}: its hot ranges cover more than "
                        f"{wire.MAX_HOT_CHUNKS} chunks of {self.chunk_size} bytes, more than "
                        "one HOT frame holds (every client would refuse it): repackage it, "
                        "or serve it with a larger --chunk-size"
                    )
                indices.update(dict.fromkeys(span))
            out[resource] = list(indices)
        return out

    async def read_chunk(self, resource: str, index: int) -> tuple[bytes, bytes | None]:
        """Chunk ``index`` of ``resource`` (short only at the end) and its hash.

        Reads inline on the event loop: a chunk from the page cache takes tens of
        microseconds, less than handing it to a thread would cost.
        """
        member = self._members[resource]
        start = index * self.chunk_size
        n = chunk_length(member.size, self.chunk_size, index)
        if index < 0 or n <= 0:
            raise DrafterError(f"chunk {index} is beyond the end of {resource}")
        known = self._hashes[resource][index] if self._hashes else None
        if known == ZERO_HASH:
            return bytes(n), known
        data = os.pread(self._fd, n, member.offset + start)
        if len(data) != n:
            raise DrafterError(f"{self.package.path} is truncated (in {resource})")
        return data, known

    def close(self) -> None:
        """Close the package file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
