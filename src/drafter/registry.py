"""Serve a package read-only: a ChunkProvider over a ``.drft`` file.

Chunks are read in place from the package's member ranges with ``os.pread`` on a
read-only descriptor; holes are found with ``SEEK_DATA`` and answered as zeros without
reading them. The package file is never written.
"""

from __future__ import annotations

import errno
import os

from drafter.errors import DrafterError
from drafter.package import RESOURCES, Package

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
        try:
            self._fd = os.open(package.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DrafterError(f"cannot open {package.path}: {e.strerror or e}") from None
        self._seek_data = True

    def manifest(self) -> dict[str, int]:
        """Resource -> size: state, memory, kernel, initramfs, disk."""
        return {r: m.size for r, m in self._members.items()}

    def config(self) -> bytes:
        """The package's config member, byte for byte."""
        return self._config

    async def read_chunk(self, resource: str, index: int) -> bytes:
        """Chunk ``index`` of ``resource`` (short only at the end of the resource).

        Reads inline on the event loop: a chunk from the page cache takes tens of
        microseconds, less than handing it to a thread would cost.
        """
        member = self._members[resource]
        start = index * self.chunk_size
        n = min(self.chunk_size, member.size - start)
        if index < 0 or n <= 0:
            raise DrafterError(f"chunk {index} is beyond the end of {resource}")
        offset = member.offset + start
        if self._is_hole(offset, n):
            return bytes(n)
        data = os.pread(self._fd, n, offset)
        if len(data) != n:
            raise DrafterError(f"{self.package.path} is truncated (in {resource})")
        return data

    def _is_hole(self, offset: int, n: int) -> bool:
        if not self._seek_data:
            return False
        try:
            return os.lseek(self._fd, offset, os.SEEK_DATA) >= offset + n
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data from here to the end of the file
                return True
            self._seek_data = False  # the filesystem cannot tell; just read
            return False

    def close(self) -> None:
        """Close the package file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
