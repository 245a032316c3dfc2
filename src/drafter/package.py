"""The ``.drft`` package: a plain tar of a VM's six resources.

Members carry the seed's names. Each member's data starts on a 4 KiB boundary (a
PAX comment pads the header), so a member can be read in place by offset; holes in
the resources are written as holes, so sparse memory and disks stay sparse on disk.
A package is only ever written to a temporary file that is renamed over the target
once complete and synced: readers see the old package or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from drafter.device import FileRange, copy_sparse
from drafter.errors import DrafterError
from drafter.vmm.base import MachineConfig

FORMAT_VERSION = 1
ALIGN = 4096
RESOURCES = ("config", "state", "memory", "kernel", "initramfs", "disk")
HOT_MEMBER = "drafter.drfthot"  # optional: byte ranges a resumed VM touches first
MAX_HOT_SIZE = 1 << 20
HotRanges = dict[str, list[tuple[int, int]]]  # resource -> [(offset, length), ...]


def member_name(resource: str) -> str:
    return f"drafter.drft{resource}"


@dataclass
class PackageConfig:
    """What the package's config member records."""

    memory_mib: int
    cpus: int
    boot_args: str
    mac: str
    format_version: int = FORMAT_VERSION
    sizes: dict[str, int] = field(default_factory=dict)  # resource -> bytes

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
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, origin: str) -> PackageConfig:
        try:
            raw = json.loads(data)
        except ValueError:
            raise DrafterError(f"{origin}: the config is not valid JSON") from None
        if not isinstance(raw, dict):
            raise DrafterError(f"{origin}: the config is not a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise DrafterError(
                f"{origin}: package format version {version!r} is not supported "
                f"(this drafter reads version {FORMAT_VERSION})"
            )
        try:
            return cls(
                memory_mib=int(raw["memory_mib"]),
                cpus=int(raw["cpus"]),
                boot_args=str(raw["boot_args"]),
                mac=str(raw["mac"]),
                format_version=version,
                sizes={str(k): int(v) for k, v in raw.get("sizes", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DrafterError(f"{origin}: the config lacks or garbles {e}") from None


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

    def range(self, resource: str) -> FileRange:
        m = self.members[resource]
        return FileRange(self.path, m.offset, m.size)

    def read(self, resource: str) -> bytes:
        m = self.members[resource]
        with self.path.open("rb") as f:
            f.seek(m.offset)
            return f.read(m.size)


def open_package(path: Path) -> Package:
    """Open and check a package; DrafterError with one readable line if it is bad."""
    path = Path(path)
    if not path.is_file():
        raise DrafterError(f"package {path} does not exist")
    file_size = path.stat().st_size
    members: dict[str, Member] = {}
    hot_member: Member | None = None
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                name = info.name
                if name.startswith("/") or ".." in name.split("/") or "/" in name:
                    raise DrafterError(f"{path}: member {name!r} tries to escape the package")
                if name == HOT_MEMBER:
                    if not info.isfile() or info.size > MAX_HOT_SIZE:
                        raise DrafterError(f"{path}: member {name} is not a small regular file")
                    hot_member = Member("hot", info.offset_data, info.size)
                    continue
                resource = name.removeprefix("drafter.drft")
                if not name.startswith("drafter.drft") or resource not in RESOURCES:
                    continue  # unknown members are ignored, for forward compatibility
                if not info.isfile():
                    raise DrafterError(f"{path}: member {name} is not a regular file")
                if info.offset_data + info.size > file_size:
                    raise DrafterError(f"{path}: the package is truncated (in {name})")
                members[resource] = Member(resource, info.offset_data, info.size)
    except tarfile.TarError as e:
        raise DrafterError(f"{path}: not a readable tar package ({e})") from None
    missing = [r for r in RESOURCES if r not in members]
    if missing:
        raise DrafterError(f"{path}: missing member(s) {', '.join(map(member_name, missing))}")
    pkg = Package(path, PackageConfig(0, 0, "", ""), members)
    pkg.config = PackageConfig.from_json(pkg.read("config"), str(path))
    mem = members["memory"].size
    if mem != pkg.config.memory_mib << 20:
        raise DrafterError(
            f"{path}: memory member holds {mem} bytes, the config says {pkg.config.memory_mib} MiB"
        )
    for resource, size in pkg.config.sizes.items():
        if resource in members and members[resource].size != size:
            raise DrafterError(f"{path}: {member_name(resource)} size differs from the config")
    if hot_member is not None:
        if hot_member.offset + hot_member.size > file_size:
            raise DrafterError(f"{path}: the package is truncated (in {HOT_MEMBER})")
        with path.open("rb") as f:
            f.seek(hot_member.offset)
            pkg.hot = parse_hot(f.read(hot_member.size), {r: m.size for r, m in members.items()})
    return pkg


def parse_hot(data: bytes, sizes: dict[str, int]) -> HotRanges:
    """The hot member: ``{"memory": [[offset, length], ...], ...}`` within the resources."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        raise DrafterError(f"{HOT_MEMBER} is not valid JSON") from None
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
    """Chunk indices (of ``chunk_size``) as merged byte ranges, per resource."""
    hot: HotRanges = {}
    for resource, indices in chunks.items():
        ranges: list[tuple[int, int]] = []
        for index in sorted(set(indices)):
            start = index * chunk_size
            length = min(chunk_size, sizes[resource] - start)
            if length <= 0:
                continue
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            else:
                ranges.append((start, length))
        if ranges:
            hot[resource] = ranges
    return hot


def _header(name: str, size: int, offset: int) -> bytes:
    """A tar header for ``name`` that makes its data start on an ALIGN boundary."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    buf = info.tobuf(tarfile.GNU_FORMAT)
    pad = 0
    while (offset + len(buf)) % ALIGN:
        pad += 1
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

    def copy_to(self, dst_fd: int, dst_offset: int) -> None: ...


def write_package(
    path: Path,
    config: PackageConfig,
    sources: dict[str, Source | Path],
    hot: HotRanges | None = None,
) -> None:
    """Write a package atomically from its resources (files or devices), with the
    ranges a resumed VM touches first when ``hot`` is given."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ranges: dict[str, Source] = {}
    for resource in RESOURCES[1:]:
        src = sources[resource]
        ranges[resource] = FileRange.whole(src) if isinstance(src, Path) else src
    config.sizes = {r: ranges[r].size for r in ranges}
    config_bytes = config.to_json()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            offset = 0
            for resource in RESOURCES:
                size = len(config_bytes) if resource == "config" else ranges[resource].size
                head = _header(member_name(resource), size, offset)
                os.pwrite(fd, head, offset)
                offset += len(head)
                if resource == "config":
                    os.pwrite(fd, config_bytes, offset)
                else:
                    ranges[resource].copy_to(fd, offset)
                offset += (size + 511) // 512 * 512
            if hot:
                body = json.dumps({r: [list(x) for x in v] for r, v in hot.items()}).encode()
                head = _header(HOT_MEMBER, len(body), offset)
                os.pwrite(fd, head + body, offset)
                offset += len(head) + (len(body) + 511) // 512 * 512
            end = offset + 2 * 512  # two zero blocks end a tar
            end = (end + 10239) // 10240 * 10240  # whole records, as tar writes them
            os.ftruncate(fd, end)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DrafterError(f"cannot write package {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
