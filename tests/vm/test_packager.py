"""Packager failures leave nothing at the output path; the console takes a login."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

from drafter.blueprint.builder import BlueprintSpec, build
from support.common import CACHE, assert_one_line_error, children, command, stop_process, wait_gone
from support.vms import copy_package, packager


def test_interrupted_packager_leaves_nothing(redis_blueprint, network, workdir: Path) -> None:
    out = workdir / "out.drft"
    proc = subprocess.Popen(
        [
            command("drafter-packager"),
            "--netns",
            network.name(0),
            "--memory-size",
            "256",
            "--kernel-path",
            str(redis_blueprint.kernel),
            "--initramfs-path",
            str(redis_blueprint.initramfs),
            "--disk-path",
            str(redis_blueprint.disk),
            "--package-output-path",
            str(out),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60  # the disk is copied first: slow on a busy host
        qemu = children(proc.pid)
        while not qemu and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            qemu = children(proc.pid)
        assert qemu, "the packager should be running QEMU by now"
        time.sleep(2)  # QEMU is booting the guest
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert "Traceback" not in err
        wait_gone(qemu)
    finally:
        stop_process(proc, signal.SIGKILL)
    assert list(workdir.iterdir()) == []


def test_no_liveness_within_timeout(redis_blueprint, workdir: Path) -> None:
    out = workdir / "out.drft"
    result = packager(redis_blueprint, out, "--netns", "", "--liveness-timeout", "3")
    assert_one_line_error(result, "liveness within 3s")
    assert list(workdir.iterdir()) == []


def test_agent_error_fails_the_packager_and_leaves_nothing(workdir: Path) -> None:
    """A guest whose BeforeSuspend hook fails (a blueprint customized for it)."""
    script = workdir / "failing-hook.sh"
    script.write_text(
        r"""sed -i "s|exec /usr/sbin/drafter-agent|exec /usr/sbin/drafter-agent """
        r"""--before-suspend-cmd 'echo refusing >\&2; exit 3'|" /etc/init.d/drafter-agent"""
        "\n"
    )
    bp_dir = workdir / "bp"
    spec = BlueprintSpec(app="redis", customize_script=script.read_text())
    blueprint = build(spec, bp_dir, CACHE)
    out = workdir / "out.drft"
    result = packager(blueprint, out, "--netns", "", "--memory-size", "256")
    assert_one_line_error(result, "before_suspend failed", "exited with 3", "refusing")
    assert not out.exists()
    assert sorted(p.name for p in workdir.iterdir()) == ["bp", "failing-hook.sh"]


def test_disk_full(redis_blueprint, network, workdir: Path) -> None:
    small = workdir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600M", "tmpfs", str(small)], check=True)
    try:
        out = small / "out.drft"
        result = packager(redis_blueprint, out, "--netns", network.name(1), "--memory-size", "256")
        assert_one_line_error(result, "No space left on device")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} on the console; saw {seen[-300:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def test_enable_input_gives_a_login_on_the_serial_console(
    redis_package, network, workdir: Path
) -> None:
    package = copy_package(redis_package, workdir)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the runner on a terminal
        os.execv(
            command("drafter-runner"),
            [
                "drafter-runner", "--netns", network.name(2), "--package-path", str(package),
                "--enable-input", "--persist=false",
            ],
        )  # fmt: skip
    try:
        read_until(fd, b"Ctrl-C", 30)
        for _ in range(15):  # until the console is attached and getty answers
            os.write(fd, b"\r")
            try:
                read_until(fd, b"login:", 2)
                break
            except AssertionError:
                continue
        else:
            raise AssertionError("no login prompt on the serial console")
        os.write(fd, b"root\r")
        read_until(fd, b"Password:", 30)
        os.write(fd, b"root\r")
        read_until(fd, b"root@drafter", 30)
        os.write(fd, b"echo drafter-$((6*7))\r")
        read_until(fd, b"drafter-42", 30)
        # Ctrl-C goes to the VM, not to the runner...
        os.write(fd, b"\x03")
        time.sleep(0.5)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)
        # ...which stops on a signal from elsewhere, as in the seed.
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 60
        while (status := os.waitpid(pid, os.WNOHANG)) == (0, 0):
            assert time.monotonic() < deadline
            try:
                os.read(fd, 4096)
            except OSError:
                time.sleep(0.05)
        assert os.waitstatus_to_exitcode(status[1]) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
