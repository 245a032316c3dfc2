"""What a checkpoint is in the store: content-addressed chunks, one manifest per
generation, and the head record that names the latest committed one.

Under ``s3://BUCKET/PREFIX/``::

    lease                      the right to run the VM (drafter.checkpoint.lease)
    head                       {"generation": N, "manifest": NAME, "epoch": E, ...}
    generations/N-E            the manifest of generation N by the holder of epoch E
    chunks/<BLAKE3 hex>        one chunk's bytes, named by their hash
    packs/N-E                  the page patches generation N wrote (one object)

A manifest lists, for every resource of the VM (its VMM state included), its size and
every chunk's hash (all zeros for an all-zero chunk, which has no object); with the
package config and the hot set it holds all a peer needs to resume the VM, exactly as
a package's index does. Chunks are shared by every generation (and every VM under the
prefix) that holds the same bytes.

A chunk of which only a few pages changed since it was last stored whole is not
stored whole again: its entry names that whole chunk (its *base*, or zeros) and a
*patch*: a short chain of *links*, each the bytes of the pages written in one
generation, in that generation's pack (one object per generation for all its links).
A generation adds one link per changed chunk; a chain that grows past
:data:`MAX_LINKS` is folded into one link. The chunk's hash is still of its whole
bytes: a reader applies the links to the base in order and checks the result. So a
checkpoint writes little more than the pages its guest wrote, whatever the chunk size.

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
PACKS = "packs/"
PAGE = 4096  # the unit of a patch
MAX_LINKS = 8  # links in a chunk's patch before they are folded into one
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


def pack_name(generation: int, epoch: int) -> str:
    """The pack of the patches ``generation`` wrote (by the holder of ``epoch``)."""
    return f"{PACKS}{generation:012d}-{epoch:012d}"


def pack_of(name: str) -> tuple[int, int] | None:
    """The (generation, epoch) a pack's name gives, or None if it is not one."""
    return _numbered(name, PACKS)


def generation_of(name: str) -> tuple[int, int] | None:
    """The (generation, epoch) a manifest's name gives, or None if it is not one."""
    return _numbered(name, GENERATIONS)


def _numbered(name: str, prefix: str) -> tuple[int, int] | None:
    if not name.startswith(prefix):
        return None
    generation, _, epoch = name[len(prefix) :].partition("-")
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
            or type(generation) is not int
            or not 0 < generation < MAX_GENERATION
            or type(epoch) is not int
            or not 0 < epoch < MAX_GENERATION
            or named[0] != generation
            or named[1] > epoch
            or type(committed) not in (int, float)
            or not 0 <= committed < 1e11
            or not isinstance(holder, str)
            or not 0 < len(holder) <= 256
        ):
            raise DrafterError(f"{where}{HEAD} is not a checkpoint head")
        return cls(generation, manifest, epoch, float(committed), holder)


@dataclass(frozen=True)
class Link:
    """The pages in ``mask`` of a chunk, ``length`` bytes at ``offset`` of ``pack``."""

    pack: str
    offset: int
    length: int
    mask: int


@dataclass(frozen=True)
class Patch:
    """A chunk as a whole chunk (``base``; all zeros for ZERO_HASH) with ``links``
    applied in order."""

    base: bytes
    links: tuple[Link, ...]

    @property
    def mask(self) -> int:
        """Every page the links replace."""
        mask = 0
        for link in self.links:
            mask |= link.mask
        return mask


def patch_length(mask: int, chunk_length: int) -> int:
    """The bytes of the pages in ``mask`` of a chunk of ``chunk_length`` bytes (pages
    past the chunk's end count nothing). Linear in the mask's size, whatever its bits:
    masks come from manifests, which are hostile until checked."""
    pages = -(-chunk_length // PAGE)
    mask &= (1 << pages) - 1
    total = mask.bit_count() * PAGE
    tail = chunk_length % PAGE
    if tail and mask >> (pages - 1) & 1:
        total -= PAGE - tail
    return total


def patch_pages(mask: int, chunk_length: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of pages in ``mask``, in order, clipped to the
    chunk. One step per run, not per page."""
    runs: list[tuple[int, int]] = []
    while mask:
        first = (mask & -mask).bit_length() - 1  # the run's first page
        above = mask >> first
        count = (above ^ (above + 1)).bit_length() - 1  # its pages (trailing ones)
        start = first * PAGE
        end = min(chunk_length, (first + count) * PAGE)
        if start >= chunk_length:
            break
        runs.append((start, end - start))
        mask &= ~(((1 << count) - 1) << first)
    return runs


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
    patches: dict[str, dict[int, Patch]] = field(default_factory=dict)  # resource -> index ->

    def digests(self) -> set[bytes]:
        """The whole chunks it needs: each non-zero chunk's own, or its patch's base."""
        zero = bytes(HASH_SIZE)
        needed = set()
        for name, hashes in self.hashes.items():
            patched = self.patches.get(name, {})
            for index, h in enumerate(hashes):
                patch = patched.get(index)
                if patch is not None:
                    if patch.base != zero:
                        needed.add(patch.base)
                elif h != zero:
                    needed.add(h)
        return needed

    def packs(self) -> set[str]:
        """The packs its patches are in."""
        return {
            link.pack
            for patched in self.patches.values()
            for patch in patched.values()
            for link in patch.links
        }

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
                    "patches": [
                        [
                            i,
                            p.base.hex(),
                            [[k.pack, k.offset, k.length, f"{k.mask:x}"] for k in p.links],
                        ]
                        for i, p in sorted(self.patches.get(name, {}).items())
                    ],  # fmt: skip
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
        patches: dict[str, dict[int, Patch]] = {}
        for name in FETCHED:
            entry = resources[name]
            try:
                size = entry["size"]
                packed = base64.b64decode(entry["hashes"], validate=True)
                listed = entry.get("patches", [])
            except (ValueError, TypeError, KeyError, AttributeError):
                raise bad from None
            if type(size) is not int or not 0 <= size <= MAX_RESOURCE:
                raise bad
            if len(packed) != chunk_count(size, chunk_size) * HASH_SIZE:
                raise bad
            sizes[name] = size
            hashes[name] = [packed[i : i + HASH_SIZE] for i in range(0, len(packed), HASH_SIZE)]
            patches[name] = _parse_patches(listed, size, chunk_size, bad)
        chunks_hot: dict[str, list[int]] = {}
        for name, indices in hot.items():
            count = len(hashes[name])
            if not isinstance(indices, list) or len(indices) > count:
                raise bad
            if any(type(i) is not int or not 0 <= i < count for i in indices):
                raise bad
            chunks_hot[name] = indices
        return cls(
            generation, epoch, float(created), chunk_size, config, sizes, hashes, chunks_hot,
            patches,
        )  # fmt: skip


def _parse_patches(
    listed: object, size: int, chunk_size: int, bad: DrafterError
) -> dict[int, Patch]:
    """A resource's patch entries, each checked against the chunk it patches."""
    if not isinstance(listed, list):
        raise bad
    out: dict[int, Patch] = {}
    count = chunk_count(size, chunk_size)
    for item in listed:
        if not isinstance(item, list) or len(item) != 3:
            raise bad
        index, base, links = item
        if type(index) is not int or not 0 <= index < count or index in out:
            raise bad
        if not isinstance(base, str) or len(base) != 2 * HASH_SIZE:
            raise bad
        if not isinstance(links, list) or not 0 < len(links) <= MAX_LINKS:
            raise bad
        try:
            digest = bytes.fromhex(base)
        except ValueError:
            raise bad from None
        if digest.hex() != base:
            raise bad
        n = min(chunk_size, size - index * chunk_size)
        out[index] = Patch(digest, tuple(_parse_link(link, n, chunk_size, bad) for link in links))
    return out


def _parse_link(link: object, n: int, chunk_size: int, bad: DrafterError) -> Link:
    """One link of a chunk of ``n`` bytes."""
    if not isinstance(link, list) or len(link) != 4:
        raise bad
    pack, offset, length, mask = link
    if not isinstance(mask, str) or not 0 < len(mask) <= chunk_size // PAGE:
        raise bad
    try:
        bits = int(mask, 16)
    except ValueError:
        raise bad from None
    if (
        not isinstance(pack, str)
        or pack_of(pack) is None
        or type(offset) is not int
        or not 0 <= offset < MAX_RESOURCE
        or type(length) is not int
        or not 0 < bits < 1 << -(-n // PAGE)
        or length != patch_length(bits, n)
    ):
        raise bad
    return Link(pack, offset, length, bits)
