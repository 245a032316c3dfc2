"""Chunk hashes: BLAKE3-256 of a chunk's bytes, or ZERO_HASH for an all-zero chunk."""

from __future__ import annotations

import errno
import os

import blake3

from drafter.chunks import ZERO_HASH

_ZEROS: dict[int, bytes] = {}


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    zeros = _ZEROS.get(len(data))
    if zeros is None:
        zeros = _ZEROS.setdefault(len(data), bytes(len(data)))
    return data == zeros


def chunk_hash(data: bytes) -> bytes:
    """The wire hash of a chunk's bytes (ZERO_HASH when they are all zero)."""
    return ZERO_HASH if is_zero(data) else blake3.blake3(data).digest()


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3-256 of ``data`` (what a received payload is checked against)."""
    return blake3.blake3(data).digest()


PROOF_TAG_SIZE = 16


def proof_tag(nonce: bytes, data: bytes) -> bytes:
    """A migration's proof of possession of one chunk: BLAKE3(nonce || bytes), 16 bytes
    (docs/migration.md, "Proof of possession")."""
    hasher = blake3.blake3(nonce)
    hasher.update(data)
    return hasher.digest(length=PROOF_TAG_SIZE)


def file_hashes(fd: int, offset: int, size: int, chunk_size: int) -> list[bytes]:
    """Hashes of ``size`` bytes of ``fd`` from ``offset``, chunk by chunk; holes are
    recognised with SEEK_DATA and never read."""
    hashes = []
    seek_data = True
    for start in range(0, size, chunk_size):
        n = min(chunk_size, size - start)
        if seek_data:
            try:
                if os.lseek(fd, offset + start, os.SEEK_DATA) >= offset + start + n:
                    hashes.append(ZERO_HASH)
                    continue
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole from here on
                    hashes.append(ZERO_HASH)
                    continue
                seek_data = False
        data = os.pread(fd, n, offset + start)
        data += bytes(n - len(data))
        hashes.append(chunk_hash(data))
    return hashes
