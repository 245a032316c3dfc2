"""Failing tests leave nothing behind: no QEMU, FUSE mount, namespace, nft table or temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.common import ROOT


def qemu_pids(using: Path) -> set[int]:
    """QEMU processes whose command line names a path under ``using``.

    (Not every QEMU: a suite running at the same time elsewhere has its own.)
    """
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                comm = (proc / "comm").read_text()
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if comm.startswith("qemu-system") and str(using).encode() in cmdline:
                pids.add(int(proc.name))
    return pids


def test_failing_tests_clean_up_after_themselves(redis_package, workdir: Path) -> None:
    tmp = workdir / "tmp"
    tmp.mkdir()
    env = dict(
        os.environ,
        DRAFTER_TEST_PREFIX="dfail",
        DRAFTER_TEST_CIDR_BASE="210",
        TMPDIR=str(tmp),
        DRAFTER_TEST_PACKAGE=str(redis_package),
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "vm" / "scenarios" / "scenario_failing.py"),
        ],  # fmt: skip
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 failed" in result.stdout, result.stdout
    assert "failing on purpose" in result.stdout
    assert qemu_pids(tmp) == set()
    assert "dfail" not in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "drafter_dfail" not in tables
    assert " fuse" not in "".join(
        line for line in Path("/proc/mounts").read_text().splitlines(True) if str(tmp) in line
    )
    assert list(tmp.iterdir()) == []
