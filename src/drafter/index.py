"""A package's index: what a reader must know to fetch it by range, in one place.

The index is the first member of every package this project writes
(``drafter.drftindex``), so a reader finds it without scanning the tar: the first
range request (:data:`FIRST_READ` bytes) holds its tar header and usually all of it;
a second one fetches the rest. It records the chunk size, where each member lies and
how large it is, the config's digest, every chunk's hash of the five data resources
(:data:`ZERO_HASH` for all-zero chunks, never fetched) and the hot set as chunk
indices. Layout (little endian)::

    b"DRFTIDX1"  u32 JSON length  JSON (padded)  hashes  [lengths]  MAC (32 bytes)

The hashes follow the JSON in the order of ``RESOURCES[1:]``, ``chunk_count(size)``
of 32 bytes per resource. A version 2 index (a package with a *pack*) has a u32 per
chunk after them, in the same order: the chunk's length as a zstd frame in the pack
member (``drafter.drftpack``), or 0 for a chunk the pack does not hold (all zeros,
or one that does not compress), which a reader takes from its member. The frames lie
in the pack in that order, back to back, so a chunk's place is the sum of the
lengths before it, and a run of packed chunks is one range of the pack. The last 32
bytes are a keyed BLAKE3 MAC of everything before them, with a key derived from the
token when the package was written with one (:func:`index_key`), else BLAKE3 of it
unkeyed (the *index digest*, which a reader without the token can pin:
``--index-digest``). A reader that holds a token accepts only an index whose MAC checks with
it, so a store, a CDN or a man in the middle can change neither the index nor,
through the hashes, a chunk.
"""

from __future__ import annotations

import hmac
import json
import struct
from dataclasses import dataclass, field

import blake3

from drafter.chunks import HASH_SIZE, PAGE, RESOURCES, ZERO_HASH, chunk_count, chunk_length
from drafter.errors import DrafterError

INDEX_MEMBER = "drafter.drftindex"
MAGIC = b"DRFTIDX1"
INDEX_VERSION = 1
PACKED_VERSION = 2  # the index of a package with a pack: chunk lengths after the hashes
PACK_MEMBER = "drafter.drftpack"
INDEX_CHUNK_SIZE = 256 * 1024  # what a range request carries: large enough for a link
FIRST_READ = 256 * 1024  # the first range request of a reader
MAX_JSON = 4 << 20  # the hot set is at most 1 MiB of JSON in its own member
MAX_INDEX_SIZE = 300 << 20  # 8 Mi chunks (2 TiB at 256 KiB) at 36 bytes each, and the head
MAC_SIZE = 32
MIN_CHUNK, MAX_CHUNK = PAGE, 16 << 20
_HEAD = struct.Struct("<8sI")
_LENGTH = struct.Struct("<I")
DATA = RESOURCES[1:]  # the members that have chunk hashes
_KEY_CONTEXT = "drafter 2026-12 package index MAC"
ADD_INDEX = "drafter-packager --add-index"  # the command that gives an old package one


def index_key(token: str) -> bytes:
    """The MAC key of packages written with ``token``."""
    return blake3.blake3(token.encode(), derive_key_context=_KEY_CONTEXT).digest()


def seal(body: bytes, key: bytes | None) -> bytes:
    """The 32 bytes that end an index: its MAC under ``key``, or its digest."""
    if key is None:
        return blake3.blake3(body).digest()
    return blake3.blake3(body, key=key).digest()


@dataclass
class MemberPlace:
    offset: int
    size: int


@dataclass
class PackageIndex:
    """An index, as written or as read and checked."""

    chunk_size: int
    members: dict[str, MemberPlace]  # config and the five data resources (and "hot")
    config_digest: bytes
    hashes: dict[str, list[bytes]] = field(default_factory=dict)  # DATA -> per chunk
    hot: dict[str, list[int]] = field(default_factory=dict)  # resource -> chunk indices
    signed: bool = False  # whether the MAC was made with a token's key
    # DATA -> each chunk's length in the pack (0: not in it); empty without a pack
    packed: dict[str, list[int]] = field(default_factory=dict)
    # the head is padded to at least this many bytes (the size a layout made room for)
    head_size: int = field(default=0, compare=False)

    @property
    def has_pack(self) -> bool:
        return "pack" in self.members

    def pack_places(self, resource: str) -> list[int]:
        """Where each chunk of ``resource`` starts in the package (its frame in the pack)."""
        at = self.members["pack"].offset
        for r in DATA:
            if r == resource:
                break
            at += sum(self.packed[r])
        places = []
        for n in self.packed[resource]:
            places.append(at)
            at += n
        return places

    def head(self) -> bytes:
        """The JSON part, padded to a whole 512 bytes with the fixed head."""
        doc = {
            "version": PACKED_VERSION if self.has_pack else INDEX_VERSION,
            "chunk_size": self.chunk_size,
            "members": {r: [m.offset, m.size] for r, m in self.members.items()},
            "config_blake3": self.config_digest.hex(),
            "hot": self.hot,
            "signed": self.signed,
        }
        text = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        longest = len(text) + int(self.signed)  # "false" is a byte longer than "true"
        padded = longest + (-(longest + _HEAD.size)) % 512  # the same either way
        padded = max(padded, self.head_size - _HEAD.size)
        return _HEAD.pack(MAGIC, padded) + text.ljust(padded)

    def hash_bytes(self) -> int:
        return self.chunks() * HASH_SIZE

    def length_bytes(self) -> int:
        return self.chunks() * _LENGTH.size if self.has_pack else 0

    def chunks(self) -> int:
        return sum(chunk_count(self.members[r].size, self.chunk_size) for r in DATA)

    def size(self) -> int:
        """The index member's size in bytes."""
        return len(self.head()) + self.hash_bytes() + self.length_bytes() + MAC_SIZE

    def to_bytes(self, key: bytes | None) -> bytes:
        """The member's bytes, sealed with ``key`` (a token's) or with its digest."""
        self.signed = key is not None
        parts = [self.head()]
        for r in DATA:
            hashes = self.hashes[r]
            if len(hashes) != chunk_count(self.members[r].size, self.chunk_size):
                raise ValueError(f"{r}: {len(hashes)} hashes for its chunks")
            parts.append(b"".join(hashes))
        if self.has_pack:
            for r in DATA:
                lengths = self.packed[r]
                if len(lengths) != len(self.hashes[r]):
                    raise ValueError(f"{r}: {len(lengths)} pack lengths for its chunks")
                parts.append(b"".join(_LENGTH.pack(n) for n in lengths))
        body = b"".join(parts)
        return body + seal(body, key)


def parse_index(data: bytes, origin: str, key: bytes | None, pin: bytes | None) -> PackageIndex:
    """Read and check an index member; DrafterError with one line naming ``origin``.

    With ``key`` (from the token) the MAC must check with it; with ``pin`` the whole
    member's BLAKE3 must equal it; with neither, the unkeyed digest must match (which
    catches damage, not a forger). Every offset, size, hash count and hot index is
    checked before it is believed.
    """
    if len(data) < _HEAD.size + MAC_SIZE or len(data) > MAX_INDEX_SIZE:
        raise DrafterError(f"{origin}: the package index has an impossible size ({len(data)})")
    if pin is not None and not hmac.compare_digest(blake3.blake3(data).digest(), pin):
        raise DrafterError(f"{origin}: the package index does not match the pinned digest")
    body, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    if key is not None:
        if not hmac.compare_digest(seal(body, key), mac):
            raise DrafterError(
                f"{origin}: the package index's MAC does not check with the token: it was "
                "changed, or written with another token (or none)"
            )
    elif pin is None and not hmac.compare_digest(seal(body, None), mac):
        if _signed(body):
            raise DrafterError(f"{origin}: the package index is signed: give its token")
        raise DrafterError(f"{origin}: the package index is damaged (its digest differs)")
    magic, json_len = _HEAD.unpack_from(body)
    if magic != MAGIC:
        raise DrafterError(f"{origin}: not a package index (bad magic)")
    if json_len > MAX_JSON or _HEAD.size + json_len > len(body):
        raise DrafterError(f"{origin}: the package index's head is too large")
    doc = _json(body[_HEAD.size : _HEAD.size + json_len], origin)
    index = _from_doc(doc, origin)
    hashes = memoryview(body)[_HEAD.size + json_len :]
    if len(hashes) != index.hash_bytes() + index.length_bytes():
        raise DrafterError(
            f"{origin}: the package index holds {len(hashes)} bytes of hashes, "
            f"its members need {index.hash_bytes() + index.length_bytes()}"
        )
    pos = 0
    for r in DATA:
        n = chunk_count(index.members[r].size, index.chunk_size)
        index.hashes[r] = [
            bytes(hashes[i : i + HASH_SIZE]) for i in range(pos, pos + n * HASH_SIZE, HASH_SIZE)
        ]
        pos += n * HASH_SIZE
    if index.has_pack:
        _read_lengths(index, hashes[pos:], origin)
    return index


def _read_lengths(index: PackageIndex, raw: memoryview, origin: str) -> None:
    """The pack's chunk lengths, checked: a zero chunk is never packed, a packed one is
    shorter than the chunk, and the frames fill the pack member exactly."""
    pos = 0
    for r in DATA:
        size = index.members[r].size
        lengths = []
        for i, h in enumerate(index.hashes[r]):
            (n,) = _LENGTH.unpack_from(raw, pos)
            pos += _LENGTH.size
            if n and (h == ZERO_HASH or n >= chunk_length(size, index.chunk_size, i)):
                raise DrafterError(f"{origin}: the package index has a bad pack length")
            lengths.append(n)
        index.packed[r] = lengths
    if sum(sum(v) for v in index.packed.values()) != index.members["pack"].size:
        raise DrafterError(f"{origin}: the package index's pack lengths do not fill the pack")


def _signed(body: bytes) -> bool:
    try:
        _, n = _HEAD.unpack_from(body)
        return bool(json.loads(body[_HEAD.size : _HEAD.size + min(n, MAX_JSON)]).get("signed"))
    except (ValueError, AttributeError, RecursionError, struct.error):
        return False


def _json(text: bytes, origin: str) -> dict[str, object]:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise DrafterError(f"{origin}: the package index's head is not valid JSON") from None
    if not isinstance(doc, dict):
        raise DrafterError(f"{origin}: the package index's head is not a JSON object")
    return doc


def _int(value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError
    return value


def _from_doc(doc: dict[str, object], origin: str) -> PackageIndex:
    bad = f"{origin}: the package index has a bad "
    version = doc.get("version")
    if type(version) is not int or version not in (INDEX_VERSION, PACKED_VERSION):
        raise DrafterError(
            f"{origin}: package index version {doc.get('version')!r} is not supported"
        )
    try:
        chunk_size = _int(doc.get("chunk_size"), MIN_CHUNK, MAX_CHUNK)
        if chunk_size % PAGE:
            raise ValueError
    except ValueError:
        raise DrafterError(bad + "chunk size") from None
    raw = doc.get("members")
    if not isinstance(raw, dict) or not set(RESOURCES) <= set(raw) <= {*RESOURCES, "hot", "pack"}:
        raise DrafterError(bad + "member table")
    if ("pack" in raw) != (version == PACKED_VERSION):
        raise DrafterError(bad + "member table (a pack goes with version 2)")
    members: dict[str, MemberPlace] = {}
    try:
        for name, place in raw.items():
            if not isinstance(place, list) or len(place) != 2:
                raise ValueError
            members[name] = MemberPlace(_int(place[0], 0, 1 << 60), _int(place[1], 0, 1 << 50))
    except ValueError:
        raise DrafterError(bad + "member table") from None
    spans = sorted((m.offset, m.offset + m.size) for m in members.values())
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise DrafterError(f"{origin}: the package index's members overlap")
    try:
        digest = bytes.fromhex(str(doc.get("config_blake3")))
        if len(digest) != HASH_SIZE:
            raise ValueError
    except ValueError:
        raise DrafterError(bad + "config digest") from None
    hot: dict[str, list[int]] = {}
    raw_hot = doc.get("hot")
    if not isinstance(raw_hot, dict):
        raise DrafterError(bad + "hot set")
    try:
        for name, indices in raw_hot.items():
            if name not in DATA or not isinstance(indices, list):
                raise ValueError
            top = chunk_count(members[name].size, chunk_size) - 1
            hot[name] = [_int(i, 0, top) for i in indices]
    except ValueError:
        raise DrafterError(bad + "hot set") from None
    return PackageIndex(chunk_size, members, digest, {}, hot, bool(doc.get("signed")))
