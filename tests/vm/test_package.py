"""The .drft format: layout, sparseness, and bad packages refused without being touched.

Hostile packages (issue 10) go to both ``drafter-registry`` and ``drafter-runner``:
each must exit with one error line, leave the file as it was, start nothing (the
runner finds a fake QEMU first in its PATH that would leave a mark) and never hold
a member it refuses in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from drafter.package import (
    ALIGN,
    HOT_MEMBER,
    MAX_STATE_SIZE,
    RESOURCES,
    PackageConfig,
    member_name,
    write_package,
)
from support.common import assert_one_line_error, command, run_command, stop_process
from support.packages import small_package

if TYPE_CHECKING:  # pytest would try to collect a Test* class imported here
    from support.vms import TestNetwork

MIB = 1 << 20


def digest(path: Path) -> str:
    """SHA-256 of the size, and of every data extent with its offset: holes are not
    read, so a 512 MiB hole costs nothing (and a hole filled with zeros would show)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "big"))
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # only a hole remains
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            h.update(data.to_bytes(8, "big"))
            for offset in range(data, hole, 8 * MIB):
                h.update(os.pread(fd, min(8 * MIB, hole - offset), offset))
            pos = hole
    return h.hexdigest()


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


# -- hostile packages (issue 10) ---------------------------------------------------------

Entry = tuple[tarfile.TarInfo, "bytes | int"]  # data, or a hole of that many bytes
CONFIG = member_name("config")
DISK = member_name("disk")
STATE = member_name("state")


def entries(pkg: Path) -> list[Entry]:
    with tarfile.open(pkg) as tar:
        out: list[Entry] = []
        for info in tar:
            f = tar.extractfile(info)
            out.append((info, f.read() if f is not None else b""))
    return out


def write_tar(pkg: Path, members: list[Entry]) -> None:
    """A tar of exactly these headers (as given) and data; an int is left as a hole."""
    fd = os.open(pkg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        for info, data in members:
            fmt = tarfile.PAX_FORMAT if info.pax_headers else tarfile.GNU_FORMAT
            head = info.tobuf(fmt)
            os.pwrite(fd, head, offset)
            offset += len(head)
            if isinstance(data, bytes):
                os.pwrite(fd, data, offset)
            offset += (max(info.size, 0) + 511) // 512 * 512
        os.ftruncate(fd, offset + 1024)
    finally:
        os.close(fd)


def member(name: str, data: bytes | int, **attrs: object) -> Entry:
    info = tarfile.TarInfo(name)
    info.size = data if isinstance(data, int) else len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def replacing(name: str, new: Callable[[bytes], list[Entry]]) -> Callable[[Path], None]:
    """Rewrite the package with member ``name`` replaced by ``new(its data)``."""

    def build(pkg: Path) -> None:
        out: list[Entry] = []
        for info, data in entries(pkg):
            out += new(data) if info.name == name else [(info, data)]
        write_tar(pkg, out)

    return build


def with_config(text: str) -> Callable[[Path], None]:
    return replacing(CONFIG, lambda _: [member(CONFIG, text.encode())])


def with_fields(**changes: object) -> Callable[[Path], None]:
    def new(data: bytes) -> list[Entry]:
        raw = json.loads(data)
        raw.update(changes)
        return [member(CONFIG, json.dumps(raw).encode())]

    return replacing(CONFIG, new)


def gnu_tar_sparse(*options: str) -> Callable[[Path], None]:
    """Members extracted to files, the memory with holes, then packed by GNU ``tar
    --sparse``, which stores the memory sparse: its data in the tar is only what lies
    between holes, yet the tar is long enough that nothing looks truncated."""

    def build(pkg: Path) -> None:
        with tempfile.TemporaryDirectory(dir=pkg.parent) as tmp:
            names = []
            for info, data in entries(pkg):
                names.append(info.name)
                with (Path(tmp) / info.name).open("wb") as f:
                    if info.name != member_name("memory"):
                        f.write(data)  # dense, stored as it is
                        continue
                    for offset in range(0, len(data), ALIGN):  # zero blocks become holes
                        if data[offset : offset + ALIGN].strip(b"\0"):
                            os.pwrite(f.fileno(), data[offset : offset + ALIGN], offset)
                    f.truncate(len(data))
            subprocess.run(["tar", "--sparse", *options, "-cf", str(pkg), "-C", tmp, *names],
                           check=True)  # fmt: skip
        with tarfile.open(pkg) as tar:
            assert tar.getmember(member_name("memory")).issparse()

    return build


def negative_size(pkg: Path) -> None:
    """A first member whose size field (GNU base-256) says -512: tarfile steps back to
    the start and takes that for the end of the archive."""
    info, _ = member("x", 0)
    head = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    head[124:136] = b"\xff" + (256**11 - 512).to_bytes(11, "big")
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    pkg.write_bytes(bytes(head) + pkg.read_bytes())


def huge_state(pkg: Path) -> None:
    """A state member (a hole) over the cap, of the size the config gives it."""
    with_fields(sizes={"state": MAX_STATE_SIZE + 1})(pkg)
    replacing(STATE, lambda _: [member(STATE, MAX_STATE_SIZE + 1)])(pkg)


def appended(*extra: Entry) -> Callable[[Path], None]:
    def build(pkg: Path) -> None:
        write_tar(pkg, entries(pkg) + list(extra))

    return build


@dataclass
class Hostile:
    build: Callable[[Path], None]
    error: str  # what the one error line says


HOSTILE: dict[str, Hostile] = {
    # Members that are not plain regular files, or appear twice.
    "gnu sparse member": Hostile(gnu_tar_sparse(), "is a sparse file"),
    "pax sparse member": Hostile(gnu_tar_sparse("--format=posix"), "is a sparse file"),
    "duplicate member": Hostile(
        appended(member(CONFIG, PackageConfig(1, 2, "", "02:00:00:00:00:01").to_json())),
        f"{CONFIG} appears more than once",
    ),
    "symbolic link member": Hostile(
        replacing(DISK, lambda _: [member(DISK, 0, type=tarfile.SYMTYPE, linkname="/etc/shadow")]),
        "is a symbolic link",
    ),
    "hard link member": Hostile(
        replacing(DISK, lambda _: [member(DISK, 0, type=tarfile.LNKTYPE, linkname=STATE)]),
        "is a hard link",
    ),
    "device member": Hostile(
        replacing(DISK, lambda _: [member(DISK, 0, type=tarfile.CHRTYPE, devmajor=1, devminor=5)]),
        "is a character device",
    ),
    "huge tar header": Hostile(
        replacing(CONFIG, lambda d: [member(CONFIG, d, pax_headers={"comment": "x" * (4 * MIB)})]),
        "tar header is larger",
    ),
    "negative member size": Hostile(negative_size, "negative size"),
    # Configs that used to end in a traceback, or be read whole.
    "sizes is a list": Hostile(with_fields(sizes=[1, 2]), "sizes must map"),
    "JSON nested 50,000 deep": Hostile(
        with_config('{"format_version": 1, "x": ' + "[" * 50_000 + "]" * 50_000 + "}"),
        "not valid JSON",
    ),
    "repeated config key": Hostile(
        with_config(
            '{"format_version": 1, "memory_mib": 1, "cpus": 1, "cpus": 64, '
            '"boot_args": "", "mac": "02:00:00:00:00:01"}'
        ),
        "key 'cpus' more than once",
    ),
    "512 MiB config member": Hostile(
        replacing(CONFIG, lambda _: [member(CONFIG, 512 * MIB)]), "more than 1048576"
    ),
    "state over the cap": Hostile(huge_state, f"more than {MAX_STATE_SIZE}"),
    "duplicate hot member": Hostile(
        appended(member(HOT_MEMBER, b"{}"), member(HOT_MEMBER, b"{}")), "appears more than once"
    ),
    "hot member not JSON": Hostile(appended(member(HOT_MEMBER, b"{nope")), "not valid JSON"),
    "hot member nested 50,000 deep": Hostile(
        appended(member(HOT_MEMBER, b"[" * 50_000 + b"]" * 50_000)), "not valid JSON"
    ),
    "hot range beyond the memory": Hostile(
        appended(member(HOT_MEMBER, b'{"memory": [[0, 1099511627776]]}')), "bad range in memory"
    ),
    "hot range of a float": Hostile(
        appended(member(HOT_MEMBER, b'{"memory": [[0.5, 4096]]}')), "bad range in memory"
    ),
    # Fields out of type or range.
    "cpus 0": Hostile(with_fields(cpus=0), "cpus must be"),
    "cpus -5": Hostile(with_fields(cpus=-5), "cpus must be"),
    "cpus 10^6": Hostile(with_fields(cpus=10**6), "cpus must be"),
    "cpus 2.7": Hostile(with_fields(cpus=2.7), "cpus must be"),
    "cpus true": Hostile(with_fields(cpus=True), "cpus must be"),
    "memory '1'": Hostile(with_fields(memory_mib="1"), "memory_mib must be"),
    "memory 0": Hostile(with_fields(memory_mib=0), "memory_mib must be"),
    "format_version true": Hostile(with_fields(format_version=True), "format version True"),
    "MAC with QEMU options": Hostile(
        with_fields(mac="02:00:00:00:00:01,romfile=/etc/shadow"), "mac must be a unicast MAC"
    ),
    "multicast MAC": Hostile(with_fields(mac="03:00:00:00:00:01"), "mac must be a unicast MAC"),
    "boot_args with a newline": Hostile(
        with_fields(boot_args="console=ttyS0\ninit=/bin/sh"), "boot_args must be"
    ),
}


@dataclass
class Finished:
    result: subprocess.CompletedProcess
    max_rss: int  # bytes


# Runs a command and writes its peak RSS to a file. A child forked from pytest starts
# with pytest's RSS as its peak; a child of this small process does not.
_MEASURE = """
import os, signal, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda s, _f: child.send_signal(s))
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


class Command:
    """One of our commands run in the background; its peak RSS is measured."""

    def __init__(self, *argv: str, env: dict[str, str] | None = None) -> None:
        fd, self.rss_file = tempfile.mkstemp(prefix="drafter-rss-")
        os.close(fd)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _MEASURE, self.rss_file, command(argv[0]), *argv[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def finish(self, timeout: float = 60) -> Finished:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # it did not refuse: stop it, fail below
            stop_process(self.proc)
            out, err = self.proc.communicate()
        try:
            max_rss = int(Path(self.rss_file).read_text() or 0)
        finally:
            os.unlink(self.rss_file)
        result = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return Finished(result, max_rss)


def fake_qemu(directory: Path) -> tuple[dict[str, str], Path]:
    """An environment whose qemu-system-x86_64 only leaves a mark and fails."""
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    mark = bin_dir / "qemu-started"
    qemu = bin_dir / "qemu-system-x86_64"
    qemu.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    qemu.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"), mark


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_package_refused_by_registry_and_runner(
    workdir: Path, network: TestNetwork, case: str
) -> None:
    pkg = small_package(workdir)
    HOSTILE[case].build(pkg)
    env, mark = fake_qemu(workdir)
    before = digest(pkg)
    listing = sorted(p.name for p in workdir.iterdir())
    registry = Command("drafter-registry", "--package-path", str(pkg), "--laddr", "127.0.0.1:0")
    runner = Command(
        "drafter-runner", "--netns", network.name(0), "--package-path", str(pkg), env=env
    )
    for name, run in (("registry", registry.finish()), ("runner", runner.finish())):
        assert_one_line_error(run.result, HOSTILE[case].error)
        assert "serving" not in run.result.stdout, name
        # Refused before anything big was read: the 512 MiB config took the registry
        # to 682 MB before.
        assert run.max_rss < 100 * MIB, (name, run.max_rss)
    assert not mark.exists(), "the runner started QEMU"
    assert digest(pkg) == before
    assert sorted(p.name for p in workdir.iterdir()) == listing


def test_runner_streams_the_state_member(workdir: Path, network: TestNetwork) -> None:
    """A 128 MiB state (under the cap) is copied by range, never held in memory (the
    runner peaks near 35 MiB); the fake QEMU then fails, which the runner reports in
    one line, cleaning up."""
    files = {}
    block = os.urandom(MIB)
    for resource in RESOURCES[1:]:
        files[resource] = workdir / resource
        with files[resource].open("wb") as f:
            if resource == "state":
                for _ in range(128):
                    f.write(block)
            f.write(resource.encode())
            if resource == "memory":
                f.truncate(128 * MIB)
    pkg = workdir / "big-state.drft"
    write_package(pkg, PackageConfig(128, 1, "console=ttyS0", "02:00:00:00:00:01"), files)
    env, mark = fake_qemu(workdir)
    before = digest(pkg)
    listing = sorted(p.name for p in workdir.iterdir())
    runner = Command(
        "drafter-runner", "--netns", network.name(0), "--package-path", str(pkg), env=env
    ).finish()
    assert_one_line_error(runner.result, "QEMU exited with 1")
    assert mark.exists()  # it got that far: the state was copied
    assert runner.max_rss < 100 * MIB, runner.max_rss
    assert digest(pkg) == before
    assert sorted(p.name for p in workdir.iterdir()) == listing
