"""The ``.drft`` package: a plain tar of a VM's six resources.

Members carry the seed's names. Each member's data starts on a 4 KiB boundary (a
PAX comment pads the header), so a member can be read in place by offset; holes in
the resources are written as holes, so sparse memory and disks stay sparse on disk.
A package is only ever written to a temporary file that is renamed over the target
once complete and synced: readers see the old package or the new one, never a mix.
It holds guest memory and disk, so it is readable by its owner only (0600), and the
temporary file is made so that a link planted beside the target is never followed
(:mod:`drafter.atomic`).

Readers trust nothing in a package: each member they use must be a plain regular
file (not sparse, a link or a device) that appears once; the config, state and hot
members are size-capped before they are read; every config field has a strict type
and range (:meth:`PackageConfig.check`, also applied to configs from the network).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import blake3

from drafter import atomic
from drafter.chunks import RESOURCES, ZERO_HASH, chunk_count, chunk_length, chunk_span
from drafter.device import FileRange, Sink, copy_sparse
from drafter.errors import DrafterError
from drafter.hashes import is_zero
from drafter.index import (
    ADD_INDEX,
    INDEX_CHUNK_SIZE,
    INDEX_MEMBER,
    MAX_INDEX_SIZE,
    PACK_MEMBER,
    MemberPlace,
    PackageIndex,
    parse_index,
)
from drafter.pack import Packer
from drafter.vmm.base import MachineConfig, brief, check_shape

FORMAT_VERSION = 1
ALIGN = 4096
HOT_MEMBER = "drafter.drfthot"  # optional: byte ranges a resumed VM touches first
MAX_HOT_SIZE = 1 << 20
MAX_CONFIG_SIZE = 1 << 20  # ours are a few hundred bytes; checked before reading it
# QEMU's device state without RAM (x-ignore-shared) is tens of KiB; the cap keeps a
# hostile package from passing gigabytes off as state.
MAX_STATE_SIZE = 256 << 20
MAX_MEMBERS = 64  # a package has seven; room for members a later version may add
# tarfile reads a PAX or long-name header whole (ours pad to at most 4 KiB).
MAX_HEADER_SIZE = 64 << 10
MAX_RESOURCE_SIZE = 1 << 50  # a size in the config: 1 PiB is more than any resource
_CAPS = {
    "config": MAX_CONFIG_SIZE,
    "state": MAX_STATE_SIZE,
    "hot": MAX_HOT_SIZE,
    "index": MAX_INDEX_SIZE,
}
_TAR_KINDS = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.DIRTYPE: "directory",
    tarfile.CONTTYPE: "contiguous file",
}
HotRanges = dict[str, list[tuple[int, int]]]  # resource -> [(offset, length), ...]


def member_name(resource: str) -> str:
    return f"drafter.drft{resource}"


class PackageWriteError(DrafterError):
    """A package could not be written (a full disk, say); the old one is untouched."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot write package {path}: {reason}")
        self.reason = reason


@dataclass
class PackageConfig:
    """What the package's config member records: the VM's shape and the resources'
    sizes. Checked when made (DrafterError if a field has a wrong type or range)."""

    memory_mib: int
    cpus: int
    boot_args: str
    mac: str
    format_version: int = FORMAT_VERSION
    sizes: dict[str, int] = field(default_factory=dict)  # resource -> bytes

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """DrafterError (one line) if a field has a wrong type or range: the one check
        for configs from packages, from the network and from callers."""
        if type(self.format_version) is not int or self.format_version != FORMAT_VERSION:
            raise DrafterError(
                f"package format version {brief(self.format_version)} is not supported "
                f"(this drafter reads version {FORMAT_VERSION})"
            )
        try:
            check_shape(self.memory_mib, self.cpus, self.boot_args, self.mac)
        except ValueError as e:
            raise DrafterError(f"bad package config: {e}") from None
        sizes = self.sizes
        if not isinstance(sizes, dict) or not all(
            name in RESOURCES[1:] and type(size) is int and 0 <= size <= MAX_RESOURCE_SIZE
            for name, size in sizes.items()
        ):
            raise DrafterError(
                f"bad package config: sizes must map resources ({', '.join(RESOURCES[1:])}) "
                f"to byte counts, not {brief(sizes)}"
            )

    def machine(self, resources: Path, netns: str | None, accel: str = "auto") -> MachineConfig:
        """The VM shape recorded here, with its resources as files in ``resources``."""
        return MachineConfig(
            kernel=resources / "kernel",
            initramfs=resources / "initramfs",
            disk=resources / "disk",
            memory=resources / "memory",
            memory_mib=self.memory_mib,
            cpus=self.cpus,
            boot_args=self.boot_args,
            netns=netns,
            mac=self.mac,
            accel=accel,
        )

    def to_json(self) -> bytes:
        """The config member's bytes."""
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, origin: str) -> PackageConfig:
        """Parse and check a config (a package's member, or a server's); DrafterError
        with one line naming ``origin`` if it is too large, not JSON or off in any field.
        Fields this version does not know are ignored."""
        if len(data) > MAX_CONFIG_SIZE:
            raise DrafterError(
                f"{origin}: the config is {len(data)} bytes, more than {MAX_CONFIG_SIZE}"
            )
        raw = _load_json(data, f"{origin}: the config")
        if not isinstance(raw, dict):
            raise DrafterError(f"{origin}: the config is not a JSON object")
        needed = ("format_version", "memory_mib", "cpus", "boot_args", "mac")
        missing = [k for k in needed if k not in raw]
        if missing:
            raise DrafterError(f"{origin}: the config lacks {', '.join(missing)}")
        try:
            return cls(
                memory_mib=raw["memory_mib"],
                cpus=raw["cpus"],
                boot_args=raw["boot_args"],
                mac=raw["mac"],
                format_version=raw["format_version"],
                sizes=raw.get("sizes", {}),
            )
        except DrafterError as e:
            raise DrafterError(f"{origin}: {e}") from None


@dataclass(frozen=True)
class Member:
    """Where one resource lies inside the package file."""

    resource: str
    offset: int
    size: int


@dataclass
class Package:
    """An opened, validated package: its config and where each resource lies."""

    path: Path
    config: PackageConfig
    members: dict[str, Member]
    hot: HotRanges = field(default_factory=dict)
    index: Member | None = None  # the index member, in packages that have one

    def read_index(self, key: bytes | None = None, pin: bytes | None = None) -> PackageIndex:
        """The package's index, checked (:func:`drafter.index.parse_index`)."""
        if self.index is None:
            raise DrafterError(f"{self.path} has no index (older package): add one with "
                               f"`{ADD_INDEX} {self.path}`")  # fmt: skip
        return parse_index(_read(self.path, self.index), str(self.path), key, pin)

    def index_digest(self) -> str:
        """The BLAKE3 digest of the index member, hex (what ``--index-digest`` pins)."""
        if self.index is None:
            raise DrafterError(f"{self.path} has no index")
        return blake3.blake3(_read(self.path, self.index)).hexdigest()

    def range(self, resource: str) -> FileRange:
        """Where a member's bytes lie in the package file."""
        m = self.members[resource]
        return FileRange(self.path, m.offset, m.size)

    def read(self, resource: str) -> bytes:
        """A member's bytes, whole in memory: for the small ones (config)."""
        return _read(self.path, self.members[resource])

    def copy_to_file(self, resource: str, dst: Path) -> None:
        """Copy a member into a file of its own by range (never whole in memory),
        keeping its holes."""
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.members[resource].size)
            self.range(resource).copy_to(fd, 0)
        finally:
            os.close(fd)


def open_package(path: Path) -> Package:
    """Open and check a package; DrafterError with one readable line if it is bad.

    Nothing is read whole but the config and hot members (each at most 1 MiB).
    """
    path = Path(path)
    if not path.exists():
        raise DrafterError(f"package {path} does not exist")
    if not path.is_file():
        raise DrafterError(f"package {path} is not a regular file")
    members = _members(path, path.stat().st_size)
    missing = [r for r in RESOURCES if r not in members]
    if missing:
        raise DrafterError(f"{path}: missing member(s) {', '.join(map(member_name, missing))}")
    hot = members.pop("hot", None)
    index = members.pop("index", None)
    pkg = Package(path, PackageConfig.from_json(_read(path, members["config"]), str(path)), members)
    pkg.index = index
    mem = members["memory"].size
    if mem != pkg.config.memory_mib << 20:
        raise DrafterError(
            f"{path}: memory member holds {mem} bytes, the config says {pkg.config.memory_mib} MiB"
        )
    for resource, size in pkg.config.sizes.items():
        if members[resource].size != size:
            raise DrafterError(f"{path}: {member_name(resource)} size differs from the config")
    if hot is not None:
        sizes = {r: m.size for r, m in members.items()}
        try:
            pkg.hot = parse_hot(_read(path, hot), sizes)
        except DrafterError as e:
            raise DrafterError(f"{path}: {e}") from None
    return pkg


class _HeaderReader(io.FileIO):
    """The package file as tarfile sees it while listing members: it reads headers
    only, and a PAX or long-name header whole, so a huge one is refused, not read."""

    def read(self, size: int | None = -1) -> bytes:
        if size is None or not 0 <= size <= MAX_HEADER_SIZE:
            raise DrafterError(f"{self.name}: a tar header is larger than {MAX_HEADER_SIZE} bytes")
        return super().read(size) or b""


def _members(path: Path, file_size: int) -> dict[str, Member]:
    """Where each known member lies (the hot member as "hot"), after checking that
    each is a plain regular file that appears once, within its cap and the file."""
    known = {member_name(r): r for r in RESOURCES} | {HOT_MEMBER: "hot", INDEX_MEMBER: "index"}
    members: dict[str, Member] = {}
    try:
        with _HeaderReader(path) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for count, info in enumerate(tar, 1):
                name = info.name
                if count > MAX_MEMBERS:
                    raise DrafterError(f"{path}: more than {MAX_MEMBERS} members")
                if info.size < 0:  # tarfile would seek backwards, maybe for ever
                    raise DrafterError(f"{path}: member {name!r} has a negative size")
                if name.startswith("/") or ".." in name.split("/") or "/" in name:
                    raise DrafterError(f"{path}: member {name!r} tries to escape the package")
                resource = known.get(name)
                if resource is None:
                    continue  # unknown members are ignored, for forward compatibility
                if resource in members:
                    raise DrafterError(f"{path}: member {name} appears more than once")
                kind = _not_plain(info)
                if kind:
                    raise DrafterError(f"{path}: member {name} is a {kind}, not a regular file")
                cap = _CAPS.get(resource)
                if cap is not None and info.size > cap:
                    raise DrafterError(
                        f"{path}: member {name} is {info.size} bytes, more than {cap}"
                    )
                if info.offset_data + info.size > file_size:
                    raise DrafterError(f"{path}: the package is truncated (in {name})")
                members[resource] = Member(resource, info.offset_data, info.size)
            # The tar ended without its two zero blocks: the file was cut between members.
            if tar.offset + 2 * 512 > file_size and len(members) < len(known):
                raise DrafterError(f"{path}: the package is truncated (it ends after "
                                   f"{len(members)} members)")  # fmt: skip
    except tarfile.TarError as e:
        raise DrafterError(f"{path}: not a readable tar package ({e})") from None
    except OSError as e:
        raise DrafterError(f"{path}: cannot read the package ({e.strerror or e})") from None
    return members


def _not_plain(info: tarfile.TarInfo) -> str | None:
    """What a member is, if not a plain regular file. A sparse member's data in the tar
    is not its bytes (only the parts between holes); links and devices have no data."""
    if info.issparse() or any(k.startswith("GNU.sparse.") for k in info.pax_headers):
        return "sparse file"
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return _TAR_KINDS.get(info.type, "special member")
    return None


def _read(path: Path, member: Member) -> bytes:
    with path.open("rb") as f:
        f.seek(member.offset)
        return f.read(member.size)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    pass


def _load_json(data: bytes, what: str) -> object:
    """JSON from a package or the network: DrafterError for invalid, too deeply nested
    or repeated-key JSON (json.loads keeps the last of a repeated key silently)."""
    try:
        return json.loads(data, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise DrafterError(f"{what} has the key {brief(e.args[0])} more than once") from None
    except (ValueError, RecursionError):
        raise DrafterError(f"{what} is not valid JSON") from None


def parse_hot(data: bytes, sizes: dict[str, int]) -> HotRanges:
    """The hot member: ``{"memory": [[offset, length], ...], ...}`` within the resources."""
    if len(data) > MAX_HOT_SIZE:
        raise DrafterError(f"{HOT_MEMBER} is {len(data)} bytes, more than {MAX_HOT_SIZE}")
    raw = _load_json(data, HOT_MEMBER)
    hot: HotRanges = {}
    if not isinstance(raw, dict):
        raise DrafterError(f"{HOT_MEMBER} is not a JSON object")
    for resource, ranges in raw.items():
        if resource not in sizes or resource == "config" or not isinstance(ranges, list):
            raise DrafterError(f"{HOT_MEMBER}: bad entry {resource!r}")
        out = []
        for item in ranges:
            ok = (
                isinstance(item, list)
                and len(item) == 2
                and all(type(v) is int for v in item)
                and item[0] >= 0
                and item[1] > 0
                and item[0] + item[1] <= sizes[resource]
            )
            if not ok:
                raise DrafterError(f"{HOT_MEMBER}: bad range in {resource}")
            out.append((item[0], item[1]))
        hot[resource] = out
    return hot


def hot_ranges(chunks: dict[str, list[int]], chunk_size: int, sizes: dict[str, int]) -> HotRanges:
    """Chunk indices (of ``chunk_size``, in the order the VM first touched them) as byte
    ranges in the same order, neighbours merged, per resource."""
    hot: HotRanges = {}
    for resource, indices in chunks.items():
        ranges: list[tuple[int, int]] = []
        for index in dict.fromkeys(indices):
            start = index * chunk_size
            length = chunk_length(sizes[resource], chunk_size, index)
            if length <= 0:
                continue
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            else:
                ranges.append((start, length))
        if ranges:
            hot[resource] = ranges
    return hot


def _header(name: str, size: int, offset: int, length: int = 0) -> bytes:
    """A tar header for ``name`` that makes its data start on an ALIGN boundary when
    it starts at ``offset``; with ``length``, one of exactly that many bytes (to go in
    the place of another one's)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    buf = info.tobuf(tarfile.GNU_FORMAT)
    pad = 0
    while (len(buf) != length) if length else (offset + len(buf)) % ALIGN:
        pad += 1
        if pad > 2 * ALIGN:
            raise DrafterError(f"cannot make a tar header of {length} bytes for {name}")
        info.pax_headers = {"comment": "x" * pad}
        buf = info.tobuf(tarfile.PAX_FORMAT)
    return buf


def copy_file_sparse(src: Path, dst: Path) -> None:
    """Copy a whole file, keeping its holes."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(sfd).st_size
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(dfd, size)
            copy_sparse(sfd, 0, size, dfd, 0)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


class Source(Protocol):
    """A resource's bytes: a plain file range or a device."""

    @property
    def size(self) -> int: ...

    def copy_to(self, dst_fd: int, dst_offset: int, sink: Sink | None = None) -> None: ...


def write_package(
    path: Path,
    config: PackageConfig,
    sources: dict[str, Source | Path],
    hot: HotRanges | None = None,
    key: bytes | None = None,
    chunk_size: int = INDEX_CHUNK_SIZE,
    pack: bool = True,
) -> PackageIndex:
    """Write a package atomically from its resources (files or devices), with the
    ranges a resumed VM touches first when ``hot`` is given; return its index.

    The index (first member) is sealed with ``key`` (:func:`drafter.index.index_key`
    of a token) when given. Each chunk is hashed as it is copied, and with ``pack``
    compressed into the pack (the last member, :mod:`drafter.pack`): the resources are
    read once. The pack's size is known only at the end, so the layout reserves room
    in the index's head for the largest it can be (every chunk whole).
    """
    path = Path(path)
    ranges: dict[str, Source] = {}
    for resource in RESOURCES[1:]:
        src = sources[resource]
        ranges[resource] = FileRange.whole(src) if isinstance(src, Path) else src
    config.sizes = {r: ranges[r].size for r in ranges}
    config_bytes = config.to_json()
    hot_body = b""
    if hot:
        hot_body = json.dumps({r: [list(x) for x in v] for r, v in hot.items()}).encode()
    sizes = {"config": len(config_bytes), **config.sizes}
    if hot_body:
        sizes["hot"] = len(hot_body)
    if pack:
        sizes["pack"] = sum(config.sizes.values())  # at most: for the layout only
    index = PackageIndex(
        chunk_size,
        {},
        blake3.blake3(config_bytes).digest(),
        hot=hot_chunks(hot or {}, chunk_size, sizes),
        signed=key is not None,  # before the layout: the head's length depends on it
    )
    index_size = 0
    for _ in range(8):  # the index's size and the members' offsets settle at once
        places, heads = _layout(index_size, sizes)
        index.members = {r: p for r, p in places.items() if r != "index"}
        if index.size() == index_size:
            break
        index_size = index.size()
    else:
        raise DrafterError("cannot lay out the package index")  # never: offsets settle
    index.head_size = len(index.head())  # what the layout made room for
    if index_size > MAX_INDEX_SIZE:
        raise DrafterError(
            f"cannot write {path}: its index would be {index_size >> 20} MiB, more than "
            f"readers take ({MAX_INDEX_SIZE >> 20} MiB): the resources are too large"
        )
    tmp: Path | None = None
    packer: Packer | None = None
    try:
        fd, tmp = atomic.create_beside(path)  # owner-only; never through a planted link
        try:
            if pack:
                packer = Packer(fd, places["pack"].offset)
            end = 0
            for name, place in places.items():
                if name != "pack":
                    os.pwrite(fd, heads[name], place.offset - len(heads[name]))
                if name == "config":
                    os.pwrite(fd, config_bytes, place.offset)
                elif name == "hot":
                    os.pwrite(fd, hot_body, place.offset)
                elif name not in ("index", "pack"):
                    hasher = ChunkHasher(fd, place.offset, place.size, chunk_size, packer, name)
                    ranges[name].copy_to(fd, place.offset, hasher)
                    index.hashes[name] = hasher.finish()
                if name != "pack":
                    end = place.offset + (place.size + 511) // 512 * 512
            if packer is not None:
                lengths = packer.finish()
                index.packed = {r: lengths.get(r, []) for r in RESOURCES[1:]}
                at = places["pack"]
                at.size = packer.size
                head = _header(PACK_MEMBER, at.size, 0, len(heads["pack"]))
                os.pwrite(fd, head, at.offset - len(head))
                end = at.offset + (at.size + 511) // 512 * 512
            sealed = index.to_bytes(key)
            if len(sealed) != places["index"].size:
                raise DrafterError("the package index changed size after its layout")
            os.pwrite(fd, sealed, places["index"].offset)
            end += 2 * 512  # two zero blocks end a tar
            end = (end + 10239) // 10240 * 10240  # whole records, as tar writes them
            os.ftruncate(fd, end)
            os.fsync(fd)
            atomic.replace_with(fd, tmp, path)
        finally:
            os.close(fd)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise PackageWriteError(path, e.strerror or str(e)) from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if packer is not None:
            packer.abandon()
    return index


_MEMBER_NAMES = {"index": INDEX_MEMBER, "hot": HOT_MEMBER, "pack": PACK_MEMBER} | {
    r: member_name(r) for r in RESOURCES
}


def _layout(
    index_size: int, sizes: dict[str, int]
) -> tuple[dict[str, MemberPlace], dict[str, bytes]]:
    """Where each member's data lies (in the order written: the index first, then the
    resources in RESOURCES order, then the hot member and the pack if there are), and
    the tar header that ends just before it."""
    places: dict[str, MemberPlace] = {}
    heads: dict[str, bytes] = {}
    offset = 0
    order = ["index", *RESOURCES, *(name for name in ("hot", "pack") if name in sizes)]
    for name in order:
        size = index_size if name == "index" else sizes[name]
        head = _header(_MEMBER_NAMES[name], size, offset)
        places[name] = MemberPlace(offset + len(head), size)
        heads[name] = head
        offset += len(head) + (size + 511) // 512 * 512
    return places, heads


def hot_chunks(hot: HotRanges, chunk_size: int, sizes: dict[str, int]) -> dict[str, list[int]]:
    """Hot byte ranges as chunk indices of ``chunk_size``, in the order first touched."""
    out: dict[str, list[int]] = {}
    for resource, ranges in hot.items():
        if resource not in sizes or resource == "config":
            continue
        size = sizes[resource]
        indices: dict[int, None] = {}
        for offset, length in ranges:
            span = chunk_span(offset, min(offset + length, size) - offset, chunk_size)
            indices.update(dict.fromkeys(span))
        if indices:
            out[resource] = list(indices)
    return out


class ChunkHasher:
    """A copy's sink (:data:`drafter.device.Sink`) that writes the bytes of one member
    and hashes them chunk by chunk as they pass, as :func:`chunk_hash` would: a chunk
    never written (a hole) or written as zeros is :data:`ZERO_HASH`, and zeros are not
    written (they stay holes). With a ``packer``, each chunk goes to it too, as it ends
    (:mod:`drafter.pack`)."""

    def __init__(
        self, fd: int, base: int, size: int, chunk_size: int,
        packer: Packer | None = None, resource: str = "",
    ) -> None:  # fmt: skip
        self.fd, self.base, self.size, self.chunk_size = fd, base, size, chunk_size
        self.hashes: list[bytes] = []  # of the chunks before the current one
        self._hasher: blake3.blake3 | None = None  # the current chunk's, once non-zero
        self._fed = 0  # bytes of the current chunk the hasher has seen
        self._packer, self._resource = packer, resource
        self._chunk: bytearray | None = None  # the current chunk's bytes, when packing

    def __call__(self, at: int, data: bytes) -> None:
        pos = at - self.base
        if pos < 0 or pos + len(data) > self.size:
            raise DrafterError("a resource holds more bytes than its size")
        view = memoryview(data)
        while view:
            index = pos // self.chunk_size
            if index < len(self.hashes):
                raise DrafterError("a resource's bytes came out of order")
            self._finish_until(index)
            within = pos - index * self.chunk_size
            n = min(len(view), self.chunk_size - within)
            piece = view[:n]
            if not is_zero(piece):
                os.pwrite(self.fd, piece, self.base + pos)
                if self._hasher is None:
                    self._hasher, self._fed = blake3.blake3(), 0
                    if self._packer is not None:
                        self._chunk = bytearray(chunk_length(self.size, self.chunk_size, index))
                if self._chunk is not None:
                    self._chunk[within : within + n] = piece
                if within > self._fed:
                    self._hasher.update(bytes(within - self._fed))
                self._hasher.update(piece)
                self._fed = within + n
            pos += n
            view = view[n:]

    def _finish_until(self, index: int) -> None:
        while len(self.hashes) < index:
            length = chunk_length(self.size, self.chunk_size, len(self.hashes))
            if self._hasher is None:
                self.hashes.append(ZERO_HASH)
                if self._packer is not None:
                    self._packer.add(self._resource, None)
                continue
            if length > self._fed:
                self._hasher.update(bytes(length - self._fed))
            self.hashes.append(self._hasher.digest())
            if self._packer is not None:
                assert self._chunk is not None
                self._packer.add(self._resource, bytes(self._chunk))
            self._hasher, self._fed, self._chunk = None, 0, None

    def finish(self) -> list[bytes]:
        """Every chunk's hash (call once the copy is done)."""
        self._finish_until(chunk_count(self.size, self.chunk_size))
        return self.hashes


def add_index(path: Path, key: bytes | None = None) -> str:
    """Rewrite an older package (atomically) so it carries an index; its index digest.
    A package that has one gets it anew (sealed with ``key``, if given)."""
    package = open_package(path)
    sources: dict[str, Source | Path] = {r: package.range(r) for r in RESOURCES[1:]}
    write_package(path, package.config, sources, package.hot or None, key)
    return open_package(path).index_digest()
