"""Paths, the session's names, our commands as processes, and stopping what a test started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "out"
CACHE = OUT / "cache"
BIN = Path(sys.executable).parent
# Namespaces dt0..dt3, apart from a user's ark*; the cleanup test runs an inner
# session under another prefix.
TEST_PREFIX = os.environ.get("DRAFTER_TEST_PREFIX", "dt")
TEST_CIDR_BASE = int(os.environ.get("DRAFTER_TEST_CIDR_BASE", "230"))
# Temporary directories of this session; the pid keeps another session's apart (a
# suite running at the same time in another checkout has mounts of its own).
TMP_PREFIX = f"drafter-test-{os.getpid()}-"


def command(name: str) -> str:
    """The path of one of our commands in this virtual environment."""
    return str(BIN / name)


def run_command(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run one of our commands; return the CompletedProcess (text)."""
    return subprocess.run(
        [command(argv[0]), *argv[1:]], capture_output=True, text=True, env=env, timeout=timeout
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A failed command must say what went wrong in one line, without a traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    # Progress lines may come before it; the error itself is one line, and the last.
    errors = [ln for ln in result.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGINT, timeout: float = 30) -> int:
    """Stop a process we started, by its PID: ``sig`` first, SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            wait_killed(proc)
    return proc.returncode


def wait_killed(proc: subprocess.Popen[Any], timeout: float = 30) -> int:
    """Wait for a process we killed. One stuck on its own FUSE mount (D state) would
    hang the suite: its mounts are aborted through fusectl, and the test fails."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    aborted = abort_fuse_mounts(lambda point: f".{proc.pid}." in point or TMP_PREFIX in point)
    proc.wait(30)
    raise AssertionError(f"process {proc.pid} was stuck after SIGKILL; aborted FUSE {aborted}")


def abort_fuse_mounts(select: Callable[[str], bool]) -> list[str]:
    """Abort the FUSE connections of the drafter mounts ``select`` picks."""
    connections = Path("/sys/fs/fuse/connections")
    if not any(connections.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connections)], check=False)
    aborted = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point, kind = fields[4], fields[fields.index("-") + 1]
        if kind.startswith("fuse") and select(point):
            major, minor = fields[2].split(":")
            abort = connections / str(os.makedev(int(major), int(minor))) / "abort"
            with contextlib.suppress(OSError):
                abort.write_text("1")
                aborted.append(point)
    return aborted


def children(pid: int) -> list[int]:
    """The PIDs of the children of ``pid`` (none if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def wait_gone(pids: list[int], timeout: float = 20) -> None:
    """Wait until none of ``pids`` exists; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() for p in pids):
        assert time.monotonic() < deadline, f"processes {pids} outlived their runner"
        time.sleep(0.05)


class StderrWatch(threading.Thread):
    """Collects a process's stderr lines so a test can wait for one."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.lines: list[str] = []
        self.start()

    def run(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        """Wait until a line holds ``text``; fail the test after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} in {self.lines}"
            time.sleep(0.005)


def as_nobody(
    *argv: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as an unprivileged local user (``nobody``, no groups), with this
    environment and ``env`` added: what any account on the host could do. The caller
    must be root (the tests run as root)."""
    return subprocess.run(
        ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


_DIAL_AS_NOBODY = """
import asyncio, sys
from drafter.errors import DrafterError
from drafter.transport.client import RemoteSource

async def main() -> None:
    source = RemoteSource(sys.argv[1], retry_timeout=1)
    try:
        await source.connect()
    finally:
        await source.close()
    print("connected")

try:
    asyncio.run(main())
except DrafterError as e:
    print(f"refused: {e}")
    sys.exit(3)
"""


def dial_as_nobody(raddr: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The project's own client, run by another local account (``nobody``, with the
    settings ``env`` added to its environment), dialing ``raddr`` with no token given:
    what any user on the host could try. Exit 3 and "refused: ..." when the server
    turns it away, 0 and "connected" when it lets it in."""
    return as_nobody(sys.executable, "-c", _DIAL_AS_NOBODY, raddr, env=env)
