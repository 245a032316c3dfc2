"""What a checkpoint is in the store: content-addressed chunks, one manifest per
generation, and the head record that names the latest committed one.

Under ``s3://BUCKET/PREFIX/``::

    lease                      the right to run the VM (drafter.checkpoint.lease)
    head                       {"generation": N, "manifest": NAME, "epoch": E, ...}
    generations/N-E            the manifest of generation N by the holder of epoch E
    chunks/<BLAKE3 hex>        one chunk's bytes, named by their hash

A manifest lists, for every resource of the VM (its VMM state included), its size and
every chunk's hash (all zeros for an all-zero chunk, which has no object); with the
package config and the hot set it holds all a peer needs to resume the VM, exactly as
a package's index does. Chunks are shared by every generation (and every VM under the
prefix) that holds the same bytes: an idle VM's checkpoint writes almost nothing.

Nothing read back is believed: :meth:`Manifest.parse` and :meth:`Head.parse` check
every field's type and bound, and the hashes' count against the sizes.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

from drafter.chunks import FETCHED, HASH_SIZE, TRACKED, chunk_count
from drafter.errors import DrafterError

HEAD = "head"
GENERATIONS = "generations/"
CHUNKS = "chunks/"
FORMAT = 1
MAX_MANIFEST = 64 << 20  # bytes: 2 million chunks' hashes, far more than any VM here
MAX_RESOURCE = 1 << 40  # a resource of a TiB is absurd
MAX_GENERATION = 1 << 62
MIN_CHUNK, MAX_CHUNK = 4096, 64 << 20


def generation_name(generation: int, epoch: int) -> str:
    """The manifest's name of ``generation`` as the holder of ``epoch`` wrote it: an
    older holder that does not know it was replaced can never overwrite a newer one's."""
    return f"{GENERATIONS}{generation:012d}-{epoch:012d}"


def chunk_name(digest: bytes) -> str:
    """The object name of the chunk whose BLAKE3 hash is ``digest``."""
    return CHUNKS + digest.hex()


def generation_of(name: str) -> tuple[int, int] | None:
    """The (generation, epoch) a manifest's name gives, or None if it is not one."""
    if not name.startswith(GENERATIONS):
        return None
    generation, _, epoch = name[len(GENERATIONS) :].partition("-")
    for part in (generation, epoch):
        if len(part) != 12 or not part.isdigit() or not part.isascii():
            return None
    return int(generation), int(epoch)


def digest_of(name: str) -> bytes | None:
    """The hash a chunk's name gives, or None if it is not one."""
    if not name.startswith(CHUNKS):
        return None
    tail = name[len(CHUNKS) :]
    try:
        digest = bytes.fromhex(tail)
    except ValueError:
        return None
    return digest if len(digest) == HASH_SIZE and tail == digest.hex() else None


@dataclass(frozen=True)
class Head:
    """The head record: which generation is the latest committed one, by which epoch."""

    generation: int
    manifest: str  # the manifest's name (generation_name)
    epoch: int  # of the holder that wrote the head last (a recoverer fences with its own)
    committed: float  # wall clock (seconds since the epoch) of the commit
    holder: str

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT, "generation": self.generation, "manifest": self.manifest,
               "epoch": self.epoch, "committed": self.committed,
               "holder": self.holder}  # fmt: skip
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> Head:
        try:
            doc = json.loads(data)
            fmt, generation, epoch = doc["format"], doc["generation"], doc["epoch"]
            committed, holder, manifest = doc["committed"], doc["holder"], doc["manifest"]
            named = generation_of(manifest)
        except (ValueError, TypeError, KeyError, RecursionError, AttributeError):
            raise DrafterError(f"{where}{HEAD} is not a checkpoint head") from None
        if (
            fmt != FORMAT
            or named is None
            or named[0] != generation
            or named[1] > epoch
            or type(generation) is not int
            or not 0 < generation < MAX_GENERATION
            or type(epoch) is not int
            or not 0 < epoch < MAX_GENERATION
            or type(committed) not in (int, float)
            or not 0 <= committed < 1e11
            or not isinstance(holder, str)
            or not 0 < len(holder) <= 256
        ):
            raise DrafterError(f"{where}{HEAD} is not a checkpoint head")
        return cls(generation, manifest, epoch, float(committed), holder)


@dataclass
class Manifest:
    """One generation: everything needed to resume the VM as it was at its pause."""

    generation: int
    epoch: int
    created: float  # wall clock of the pause
    chunk_size: int
    config: bytes  # the package config (JSON), as a package carries it
    sizes: dict[str, int]  # resource -> bytes (state, kernel, initramfs, memory, disk)
    hashes: dict[str, list[bytes]]  # resource -> every chunk's hash
    hot: dict[str, list[int]] = field(default_factory=dict)  # tracked -> chunks, in order

    def digests(self) -> set[bytes]:
        """The hashes of every non-zero chunk it names (the objects it needs)."""
        zero = bytes(HASH_SIZE)
        return {h for hashes in self.hashes.values() for h in hashes if h != zero}

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "generation": self.generation,
            "epoch": self.epoch,
            "created": self.created,
            "chunk_size": self.chunk_size,
            "config": base64.b64encode(self.config).decode(),
            "resources": {
                name: {
                    "size": self.sizes[name],
                    "hashes": base64.b64encode(b"".join(self.hashes[name])).decode(),
                }
                for name in FETCHED
            },
            "hot": {name: self.hot.get(name, []) for name in TRACKED},
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> Manifest:
        """A manifest read from the store: every field checked, nothing believed."""
        bad = DrafterError(f"{where} is not a checkpoint manifest")
        if len(data) > MAX_MANIFEST:
            raise bad
        try:
            doc = json.loads(data)
            fmt, generation, epoch = doc["format"], doc["generation"], doc["epoch"]
            created, chunk_size = doc["created"], doc["chunk_size"]
            config = base64.b64decode(doc["config"], validate=True)
            resources, hot = doc["resources"], doc["hot"]
        except (ValueError, TypeError, KeyError, RecursionError):
            raise bad from None
        if (
            fmt != FORMAT
            or type(generation) is not int
            or not 0 < generation < MAX_GENERATION
            or type(epoch) is not int
            or not 0 < epoch < MAX_GENERATION
            or type(created) not in (int, float)
            or not 0 <= created < 1e11
            or type(chunk_size) is not int
            or not MIN_CHUNK <= chunk_size <= MAX_CHUNK
            or chunk_size % 4096
            or not isinstance(resources, dict)
            or set(resources) != set(FETCHED)
            or not isinstance(hot, dict)
            or not set(hot) <= set(TRACKED)
        ):
            raise bad
        sizes: dict[str, int] = {}
        hashes: dict[str, list[bytes]] = {}
        for name in FETCHED:
            entry = resources[name]
            try:
                size = entry["size"]
                packed = base64.b64decode(entry["hashes"], validate=True)
            except (ValueError, TypeError, KeyError):
                raise bad from None
            if type(size) is not int or not 0 <= size <= MAX_RESOURCE:
                raise bad
            if len(packed) != chunk_count(size, chunk_size) * HASH_SIZE:
                raise bad
            sizes[name] = size
            hashes[name] = [packed[i : i + HASH_SIZE] for i in range(0, len(packed), HASH_SIZE)]
        chunks_hot: dict[str, list[int]] = {}
        for name, indices in hot.items():
            count = len(hashes[name])
            if not isinstance(indices, list) or len(indices) > count:
                raise bad
            if any(type(i) is not int or not 0 <= i < count for i in indices):
                raise bad
            chunks_hot[name] = indices
        return cls(generation, epoch, float(created), chunk_size, config, sizes, hashes, chunks_hot)
