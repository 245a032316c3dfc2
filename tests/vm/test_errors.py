"""Bad input: a one-line error, a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from support.common import assert_one_line_error, command, run_command
from support.vms import packager


def test_unknown_app(redis_blueprint) -> None:
    assert_one_line_error(run_command("drafter-blueprint", "--app", "nosuch"), "unknown app")


def test_disk_too_small_for_the_root_file_system(redis_blueprint, workdir: Path) -> None:
    result = run_command(
        "drafter-blueprint", "--disk-size", "64M", "--output-dir", str(workdir / "bp")
    )
    assert_one_line_error(result, "too small", "--disk-size")
    assert not (workdir / "bp" / "drafter.drftdisk").exists()


def test_blueprint_kernel_path_missing(workdir: Path) -> None:
    result = run_command("drafter-blueprint", "--kernel-path", str(workdir / "vmlinux"))
    assert_one_line_error(result, "does not exist")


@pytest.mark.parametrize("which", ["kernel", "initramfs", "disk"])
def test_packager_resource_missing(redis_blueprint, workdir: Path, which: str) -> None:
    paths = {
        "kernel": str(redis_blueprint.kernel),
        "initramfs": str(redis_blueprint.initramfs),
        "disk": str(redis_blueprint.disk),
    }
    paths[which] = str(workdir / "missing")
    out = workdir / "out.drft"
    result = run_command(
        "drafter-packager",
        "--netns", "",
        "--kernel-path", paths["kernel"],
        "--initramfs-path", paths["initramfs"],
        "--disk-path", paths["disk"],
        "--package-output-path", str(out),
    )  # fmt: skip
    assert_one_line_error(result, which, "does not exist")
    assert not out.exists()


def test_memory_too_small_for_the_kernel(redis_blueprint, workdir: Path) -> None:
    out = workdir / "out.drft"
    result = packager(redis_blueprint, out, "--netns", "", "--memory-size", "32")
    assert_one_line_error(result, "too small for the kernel")
    assert not out.exists()


def test_qemu_missing(redis_blueprint, workdir: Path) -> None:
    out = workdir / "out.drft"
    env = dict(os.environ, PATH=str(workdir))  # nothing to find there
    result = packager(redis_blueprint, out, "--netns", "", env=env)
    assert_one_line_error(result, "qemu-system-x86_64 is not installed")
    assert not out.exists()
    assert [p.name for p in workdir.iterdir()] == []  # no work files left


def test_namespace_missing(redis_blueprint, workdir: Path) -> None:
    result = packager(redis_blueprint, workdir / "out.drft", "--netns", "nosuchns0")
    assert_one_line_error(result, "nosuchns0 does not exist")


@pytest.mark.parametrize(
    "argv",
    [
        ["drafter-blueprint"],
        ["drafter-packager"],
        ["drafter-runner"],
        ["drafter-daemon"],
    ],
)
def test_not_root(argv: list[str]) -> None:
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", command(argv[0])],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert_one_line_error(result, "must run as root")
