"""Attacks by other local users (issue 22, items 5 and 6): each runs as ``nobody``
in a child process against files root's commands make.

A package holds guest memory and disk, the daemon's state says what it made: other
users may neither read them nor make root write through a link they planted. A
token file others can read is refused. No QEMU: the packages are synthetic.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from drafter.network.state import DaemonLock, write_json
from support.common import as_nobody, assert_one_line_error, run_command
from support.packages import small_package
from support.wire import LOOPBACK, build_package, env_without_token

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="drops to nobody: needs root and setpriv",
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def shared(workdir: Path) -> Path:
    """A directory every local user may enter and read (as an output directory is)."""
    workdir.chmod(0o755)
    return workdir


def test_other_users_cannot_read_a_package(shared: Path) -> None:
    package = small_package(shared)
    read = as_nobody("cat", str(package))
    assert read.returncode != 0 and "Permission denied" in read.stderr, "nobody read it"
    assert mode(package) == 0o600
    # A package rewritten by a command (here: given an index) stays owner-only.
    package.chmod(0o600)
    added = run_command("drafter-packager", "--add-index", str(package))
    assert added.returncode == 0, added.stderr
    assert mode(package) == 0o600
    assert as_nobody("cat", str(package)).returncode != 0


def test_other_users_cannot_read_the_daemon_state(shared: Path) -> None:
    state = shared / "state"
    lock = DaemonLock(state / "daemon-x.lock")
    lock.acquire()
    try:
        write_json(state / "netns" / "x0.json", {"namespace": "x0"})
        write_json(state / "daemon-x.json", {"pid": os.getpid()})
        for path in (state / "daemon-x.json", state / "netns" / "x0.json"):
            assert as_nobody("cat", str(path)).returncode != 0, f"nobody read {path}"
        for path in (state, state / "netns"):
            assert mode(path) == 0o700, path
        state.chmod(0o755)  # even where the directories are open, the files are not
        (state / "netns").chmod(0o755)
        for path in (state / "daemon-x.lock", state / "daemon-x.json", state / "netns/x0.json"):
            assert mode(path) == 0o600, path
            assert as_nobody("cat", str(path)).returncode != 0, f"nobody read {path}"
    finally:
        lock.release()


def test_a_token_file_other_users_can_read_is_refused(shared: Path) -> None:
    package = build_package(shared)
    token = shared / "token"
    made = run_command("drafter-token", str(token))
    assert made.returncode == 0, made.stderr
    stolen = as_nobody("cat", str(token))
    assert stolen.returncode != 0, "drafter-token wrote a token other users can read"
    for loose in (0o640, 0o604, 0o620):
        token.chmod(loose)
        try:
            result = run_command(
                "drafter-registry", "--package-path", str(package), "--laddr", f"{LOOPBACK}:0",
                "--token-file", str(token), env=env_without_token(), timeout=15,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"the registry served with a token file of mode {loose:04o}")
        assert_one_line_error(result, str(token), "other users", f"{loose:04o}", "chmod 600")
