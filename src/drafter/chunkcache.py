"""A host's shared chunk cache: chunks kept by their hash, so that the second VM of a
package on this host fetches nothing the first one already fetched.

A chunk is one file, ``ROOT/ab/abcdef...`` (its BLAKE3 digest in hex), written to a
temporary name and renamed into place: a reader sees a whole chunk or none. Nothing
read back is believed: a chunk whose length or hash does not match is removed and
fetched again. The cache is an optimisation only: a full disk or an unwritable
directory turns it off for the process with one warning, it never fails a VM.

The directory must belong to the user who runs the peer and be closed to others
(mode 0700 is made when it is created); a cache another user can write to is refused,
since its chunks would still be verified but its files could be swapped for links.
Nothing is evicted: remove the directory (or its subdirectories) at any time to make
room; chunks being read at that moment are fetched again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from drafter.chunks import ZERO_HASH, ChunkData, Deliver, Priority
from drafter.errors import DrafterError
from drafter.hashes import digest as chunk_digest

if TYPE_CHECKING:
    from drafter.device import Device
    from drafter.transport.client import RemoteSource

log = logging.getLogger(__name__)

MAX_CHUNK = 16 << 20  # nothing larger is read back from the cache


class ChunkCache:
    """Chunks by hash in one host directory, shared by every peer that names it."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.hits = 0  # chunks served from the cache
        self.hit_bytes = 0
        self.stored = 0  # chunks written to it
        self._off = False
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.stat(self.root, follow_symlinks=False)
        except OSError as e:
            why = e.strerror or e
            raise DrafterError(f"cannot use {self.root} as a chunk cache: {why}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise DrafterError(f"the chunk cache {self.root} is not a directory")
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise DrafterError(
                f"the chunk cache {self.root} is writable by another user: "
                f"give a directory only you can write to (chmod 700)"
            )

    def _path(self, digest: bytes) -> Path:
        name = digest.hex()
        return self.root / name[:2] / name

    def get(self, digest: bytes, length: int) -> bytes | None:
        """The chunk with this hash and length, or None (absent, or not what it claims)."""
        if digest == ZERO_HASH or not 0 < length <= MAX_CHUNK:
            return None
        path = self._path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            data = os.pread(fd, length + 1, 0)
        except OSError:
            data = b""
        finally:
            os.close(fd)
        if len(data) != length or chunk_digest(data) != digest:
            log.warning("chunk cache: %s is damaged; removed it", path)
            _remove(path)
            return None
        self.hits += 1
        self.hit_bytes += length
        return data

    def put(self, digest: bytes, data: ChunkData) -> None:
        """Keep a verified chunk (its hash is ``digest``); quietly nothing if it is
        there already or the cache cannot be written."""
        if self._off or digest == ZERO_HASH:
            return
        path = self._path(digest)
        if path.exists():
            return
        unique = f"{os.getpid()}.{threading.get_ident()}.{next(_parts)}"
        part = path.parent / f".{path.name}.{unique}.part"
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(part, path)
            self.stored += 1
        except FileExistsError:
            return  # only if something else made our unique name: leave it be
        except OSError as e:
            _remove(part)
            self._off = True
            log.warning("chunk cache %s turned off: %s", self.root, e.strerror or e)


_parts = itertools.count()


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class Filling:
    """A wire source (a registry or a peer) whose verified chunks also go into the
    host's cache, so a later VM of the same content on this host need not move them
    (:func:`take_cached`). An object source keeps its cache itself. A device asks it
    for runs as it would ask the source; everything else is the source's."""

    def __init__(self, source: RemoteSource, cache: ChunkCache) -> None:
        self.source, self.cache = source, cache
        # What the source offers (ChunkSource), as it said when it connected.
        self.chunk_size = source.chunk_size
        self.manifest = source.manifest
        self.hashes = source.hashes
        self.hot = source.hot
        self.config = source.config

    async def connect(self) -> None:
        await self.source.connect()

    async def close(self) -> None:
        await self.source.close()

    async def fetch_run(
        self,
        resource: str,
        start: int,
        count: int,
        priority: Priority | int,
        expected: Sequence[bytes | None],
        deliver: Deliver,
    ) -> None:
        kept: list[tuple[bytes, bytes]] = []

        def keep(index: int, data: ChunkData, digest: bytes) -> None:
            deliver(index, data, digest)  # first: a chunk the device refuses is not kept
            if digest != ZERO_HASH:
                kept.append((digest, bytes(data)))  # the source verified it has this hash

        try:
            await self.source.fetch_run(resource, start, count, priority, expected, keep)
        finally:
            if kept:  # what arrived before a failure is good too
                await asyncio.shield(asyncio.to_thread(self._put, kept))

    def _put(self, kept: list[tuple[bytes, bytes]]) -> None:
        for digest, data in kept:
            self.cache.put(digest, data)


def take_cached(devices: dict[str, Device], cache: ChunkCache) -> int:
    """Fill each device's missing chunks whose listed hash the cache holds (each read
    back verified); the bytes taken. For a migration the list is the source's at the
    start, as for ``--local-package``: a chunk the VM changes after it is sent again."""
    taken = 0
    for device in devices.values():
        for index in device.missing():
            digest = device.hashes[index]
            if digest is None or digest == ZERO_HASH:
                continue
            data = cache.get(digest, device.chunk_length(index))
            if data is not None:
                device.fill(index, data, digest)
                taken += len(data)
    if taken:
        log.info("took %d MiB from the chunk cache %s instead of moving them",
                 taken >> 20, cache.root)  # fmt: skip
    return taken
