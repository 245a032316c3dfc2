"""The guest kernel: Debian's cloud kernel made PVH-bootable, or the user's own vmlinux.

QEMU's microvm boots an ELF ``vmlinux`` through its Xen PVH note. Debian ships a
bzImage (``vmlinuz``) whose payload is compressed; decompressing the payload gives
that ELF back, the same trick as the kernel's ``scripts/extract-vmlinux``.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from drafter.errors import DrafterError

log = logging.getLogger(__name__)

KERNEL_PACKAGE = "linux-image-cloud-amd64"
ELF_MAGIC = b"\x7fELF"

# (magic, decompressor) pairs tried in order; the first that yields an ELF wins.
_PAYLOADS: list[tuple[bytes, list[str]]] = [
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dcq"]),
    (b"\xfd7zXZ\x00", ["xz", "-dc"]),
    (b"\x1f\x8b\x08", ["gzip", "-dc"]),
]


@dataclass(frozen=True)
class KernelPackage:
    """A Debian kernel package unpacked: its ELF vmlinux and its modules tree."""

    version: str  # e.g. 6.1.0-56-cloud-amd64
    vmlinux: Path
    modules: Path  # .../lib/modules/<version>


def resolve_kernel_package(meta: str = KERNEL_PACKAGE) -> str:
    """Name of the versioned image package the meta package currently depends on."""
    out = _run(["apt-cache", "depends", "--important", meta], f"look up {meta}")
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise DrafterError(f"cannot resolve {meta} through the configured apt sources")


def is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == ELF_MAGIC


def extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """Write the ELF kernel hidden in a bzImage ``vmlinuz`` to ``out``."""
    data = vmlinuz.read_bytes()
    for magic, tool in _PAYLOADS:
        start = data.find(magic)
        while start != -1:
            # Decompressors stop at the end of their stream; the trailing bytes of the
            # bzImage make them exit non-zero, so judge by the output, not the code.
            with out.open("wb") as f:
                subprocess.run(tool, input=data[start:], stdout=f, stderr=subprocess.DEVNULL)
            if out.stat().st_size > 0 and is_elf(out):
                return
            start = data.find(magic, start + 1)
    out.unlink(missing_ok=True)
    raise DrafterError(f"{vmlinuz}: no ELF kernel found inside (unknown compression)")


def fetch_debian_kernel(workdir: Path, package: str) -> KernelPackage:
    """Download and unpack ``package`` with apt (host's sources), return its parts."""
    workdir.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", "-q", package], f"download {package}", cwd=workdir)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise DrafterError(f"apt-get download {package} produced no .deb")
    tree = workdir / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    _run(["dpkg-deb", "-x", str(debs[-1]), str(tree)], f"unpack {debs[-1].name}")
    images = sorted((tree / "boot").glob("vmlinuz-*"))
    if not images:
        raise DrafterError(f"{package} holds no /boot/vmlinuz-*")
    version = images[0].name.removeprefix("vmlinuz-")
    vmlinux = workdir / "vmlinux"
    extract_vmlinux(images[0], vmlinux)
    return KernelPackage(version, vmlinux, tree / "lib" / "modules" / version)


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    log.debug("running %s", " ".join(cmd))
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise DrafterError(f"cannot {what}: {cmd[0]} is not installed") from e
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise DrafterError(f"cannot {what}: {last}")
    return p.stdout
