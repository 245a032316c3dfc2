"""The .drft format: layout, sparseness, and bad packages refused without being touched."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_command
from drafter.package import (
    ALIGN,
    RESOURCES,
    PackageConfig,
    member_name,
    open_package,
    write_package,
)

MIB = 1 << 20


def small_package(directory: Path, memory_mib: int = 1) -> Path:
    files = {}
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


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_package_is_a_plain_aligned_sparse_tar(workdir: Path) -> None:
    pkg = small_package(workdir, memory_mib=64)
    with tarfile.open(pkg) as tar:
        names = tar.getnames()
        assert names == [member_name(r) for r in RESOURCES]
        for info in tar:
            assert info.offset_data % ALIGN == 0
        memory = tar.extractfile(member_name("memory"))
        assert memory is not None
        data = memory.read()
    assert data.startswith(b"memory") and data.endswith(b"last!")
    assert len(data) == 64 * MIB
    # Two 64 MiB resources that are mostly holes take little space on disk.
    assert os.stat(pkg).st_blocks * 512 < 4 * MIB
    opened = open_package(pkg)
    assert opened.config.memory_mib == 64
    assert opened.read("disk").endswith(b"last!")


def rewrite(pkg: Path, mutate) -> None:
    """Rebuild the tar with ``mutate(name, data) -> (name, data) | None``."""
    members = []
    with tarfile.open(pkg) as tar:
        for info in tar:
            f = tar.extractfile(info)
            assert f is not None
            got = mutate(info.name, f.read())
            if got is not None:
                members.append(got)
    with tarfile.open(pkg, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def config_with(**changes):
    def mutate(name: str, data: bytes):
        if name == member_name("config"):
            raw = json.loads(data)
            raw.update(changes)
            return name, json.dumps(raw).encode()
        return name, data

    return mutate


BAD = {
    "not a tar": lambda p: p.write_bytes(b"this is not a tar file at all" * 100),
    "truncated": lambda p: os.truncate(p, p.stat().st_size // 2),
    "missing member": lambda p: rewrite(
        p, lambda n, d: None if n == member_name("state") else (n, d)
    ),
    "future version": lambda p: rewrite(p, config_with(format_version=99)),
    "escaping name": lambda p: rewrite(
        p, lambda n, d: ("../" + n, d) if n == member_name("disk") else (n, d)
    ),
    "memory size mismatch": lambda p: rewrite(p, config_with(memory_mib=2)),
}
EXPECT = {
    "not a tar": "not a readable tar",
    "truncated": "truncated",
    "missing member": "missing member",
    "future version": "format version 99",
    "escaping name": "escape",
    "memory size mismatch": "config says 2 MiB",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_runner_refuses_bad_package_and_leaves_it_untouched(workdir: Path, case: str) -> None:
    pkg = small_package(workdir)
    BAD[case](pkg)
    before = digest(pkg)
    result = run_command("drafter-runner", "--netns", "", "--package-path", str(pkg))
    assert_one_line_error(result, EXPECT[case])
    assert digest(pkg) == before
    assert sorted(p.name for p in workdir.iterdir()) == sorted([*RESOURCES[1:], "small.drft"])


def test_runner_missing_package(workdir: Path) -> None:
    result = run_command("drafter-runner", "--package-path", str(workdir / "none.drft"))
    assert_one_line_error(result, "does not exist")
