"""The words every layer shares: a VM's resources, chunks, who waits for a chunk, and
the seam a device gets its chunks through (:class:`ChunkSource`).

This module is the bottom floor: it imports nothing of the project.
A device, the wire, the migration and the peer all speak of chunks in these terms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Protocol

# A package's members, in the order they are written into it.
RESOURCES = ("config", "state", "memory", "kernel", "initramfs", "disk")
# The resources that become devices of a VM, in the order a peer pulls them: QEMU
# reads the kernel and initramfs whole when it starts.
DEVICES = ("kernel", "initramfs", "memory", "disk")
# What a peer fetches from a remote: the VMM state (whole, first), then the devices.
FETCHED = ("state", *DEVICES)
# The resources a running VM writes: writable devices, dirty tracking in a migration,
# the hot set recorded after a resume.
TRACKED = ("memory", "disk")

CHUNK_SIZE = 64 * 1024  # a device's default chunk size
PAGE = 4096  # the unit of dirty tracking inside a chunk
HASH_SIZE = 32  # BLAKE3-256 of a chunk's bytes
ZERO_HASH = bytes(HASH_SIZE)  # the hash that stands for "this chunk is all zeros"

# A chunk's bytes as received: a view into the frame it came in (no copy).
ChunkData = bytes | bytearray | memoryview
# Receives one verified chunk of a run: (index, bytes, hash). It must not keep the
# bytes after it returns: they may be a view into a buffer that is reused.
Deliver = Callable[[int, ChunkData, bytes], None]


class Priority(IntEnum):
    """Who waits for a chunk: the VM (demand), soon the VM (prefetch: what a resumed VM
    touches first), or nobody yet (background pull). Served in that order."""

    DEMAND = 0
    BACKGROUND = 1
    PREFETCH = 2


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunks in a resource of ``size`` bytes."""
    return (size + chunk_size - 1) // chunk_size


def chunk_length(size: int, chunk_size: int, index: int) -> int:
    """Bytes in chunk ``index`` of a resource of ``size`` bytes (the last may be short)."""
    return min(chunk_size, size - index * chunk_size)


def chunk_span(offset: int, length: int, chunk_size: int) -> range:
    """The chunks under the bytes ``[offset, offset + length)`` (none if it is empty)."""
    if length <= 0:
        return range(0)
    return range(offset // chunk_size, (offset + length - 1) // chunk_size + 1)


class ChunkSource(Protocol):
    """A place a VM's chunks come from: a registry or a peer over the wire today (see
    :class:`drafter.transport.client.RemoteSource`); an object store, a host's chunk
    cache or several peers later. Everything above the device speaks to this.

    After :meth:`connect`: ``chunk_size``, ``manifest`` (resource -> bytes), ``hashes``
    (resource -> every chunk's hash, :data:`ZERO_HASH` for all-zero chunks), ``hot``
    (resource -> the chunks a resumed VM touches first) and ``config`` (the package
    config, JSON bytes) describe what it offers.
    """

    chunk_size: int
    manifest: dict[str, int]
    hashes: dict[str, list[bytes]]
    hot: dict[str, list[int]]
    config: bytes

    async def connect(self) -> None:
        """Reach the source and learn what it offers; DrafterError if it cannot."""
        ...

    async def fetch_run(
        self,
        resource: str,
        start: int,
        count: int,
        priority: Priority | int,
        expected: Sequence[bytes | None],
        deliver: Deliver,
    ) -> None:
        """Chunks ``start`` .. ``start + count - 1`` of ``resource``: each verified
        against its hash (and ``expected[i]`` where given) before it is handed to
        ``deliver``, in order. DrafterError (VerificationError for bad bytes) if a
        chunk cannot be had."""
        ...

    async def close(self) -> None:
        """Let go of the source; fetches still waiting fail."""
        ...
