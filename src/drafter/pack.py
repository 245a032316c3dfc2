"""A package's pack: its chunks compressed, for readers across a slow link.

The pack member (``drafter.drftpack``, the last one) holds every chunk that
compresses as one zstd frame, in the index's order (``DATA``, then chunk index), back
to back; the index records each frame's length (:mod:`drafter.index`, version 2). The
resources stay whole in their own members beside it, so ``drafter-runner`` and
``tar`` see the package as before. A reader over a range protocol (an object store,
an HTTP server) takes a run of packed chunks as one range of the pack: about a third
of the bytes of the members for a Redis VM (the same zstd level the registry uses on
a slow link, which it cannot use on an object store).

The packer compresses while the members are copied (the resources are read once), on
worker threads (zstd releases the GIL), and writes the frames in order at the pack's
place, which the layout knows before the first member is written.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import zstandard

from drafter.errors import DrafterError

LEVEL = 1  # the registry's level on a slow link: ~0.7 s of a core per 320 MiB
WORKERS = 2
AHEAD = 16  # chunks compressed ahead of the writes, at most (bounds the memory held)
# A chunk is packed only if its frame is at most this share of it: one that barely
# compresses is read from its member, so runs are not cut into packed and unpacked
# pieces for a few bytes.
GAIN = 0.875


class UnpackError(DrafterError):
    """A frame in the pack is not a chunk of the length its index says."""


class Packer:
    """Compresses chunks handed to it in the index's order and writes each frame of at
    most :data:`GAIN` of its chunk at ``fd`` from ``offset`` on; keeps every chunk's
    length (0 for a chunk left out)."""

    def __init__(self, fd: int, offset: int) -> None:
        self.fd, self.offset = fd, offset
        self.size = 0  # bytes of frames written
        self.lengths: dict[str, list[int]] = {}
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="pack")
        self._pending: deque[tuple[str, int, Future[bytes]]] = deque()

    def add(self, resource: str, data: bytes | None) -> None:
        """The next chunk of ``resource`` (None: all zeros, not packed)."""
        if data is None:
            self._pending.append((resource, 0, _done(b"")))
        else:
            self._pending.append((resource, len(data), self._pool.submit(_compress, data)))
        while len(self._pending) > AHEAD:
            self._write_one()

    def finish(self) -> dict[str, list[int]]:
        """Write what is left; every chunk's length in the pack, per resource."""
        try:
            while self._pending:
                self._write_one()
        finally:
            self._pool.shutdown(cancel_futures=True)
        return self.lengths

    def abandon(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _write_one(self) -> None:
        resource, raw, future = self._pending.popleft()
        frame = future.result()
        n = len(frame) if 0 < len(frame) <= raw * GAIN else 0
        if n:
            os.pwrite(self.fd, frame, self.offset + self.size)
            self.size += n
        self.lengths.setdefault(resource, []).append(n)


def _compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=LEVEL, write_content_size=True).compress(data)


def _done(value: bytes) -> Future[bytes]:
    f: Future[bytes] = Future()
    f.set_result(value)
    return f


def unpack(frame: memoryview | bytes, size: int, dctx: zstandard.ZstdDecompressor) -> bytes:
    """The chunk of ``size`` bytes a frame of the pack holds; UnpackError if the frame
    is malformed or says another size (never more than ``size`` bytes are made)."""
    try:
        if zstandard.frame_content_size(frame) != size:
            raise UnpackError("a packed chunk declares another size than its index")
        data = dctx.decompress(frame, max_output_size=size)
    except zstandard.ZstdError:
        raise UnpackError("a packed chunk is not a valid zstd frame") from None
    if len(data) != size:
        raise UnpackError("a packed chunk holds another size than its index")
    return data
