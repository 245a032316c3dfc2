"""A small synthetic package (no QEMU, no root): for the format's and the runner's tests."""

from __future__ import annotations

from pathlib import Path

from drafter.package import RESOURCES, PackageConfig, Source, write_package

MIB = 1 << 20


def small_package(directory: Path, memory_mib: int = 1) -> Path:
    """A package of every resource: its name repeated, memory and disk ``memory_mib``
    MiB long (a hole, then ``last!``)."""
    files: dict[str, Source | Path] = {}
    for resource in RESOURCES[1:]:
        path = directory / resource
        with path.open("wb") as f:
            f.write(resource.encode() * 100)
            if resource in ("memory", "disk"):
                f.truncate(memory_mib * MIB)
                f.seek(memory_mib * MIB - 5)
                f.write(b"last!")
        files[resource] = path
    pkg = directory / "small.drft"
    write_package(pkg, PackageConfig(memory_mib, 1, "console=ttyS0", "02:00:00:00:00:01"), files)
    return pkg
