"""Attacks by other local users (issue 22, items 5 and 6): each runs as ``nobody``
in a child process against files root's commands make, or plants links for root to
follow in a directory every user can write to.

A package holds guest memory and disk, the daemon's state says what it made: other
users may neither read them nor make root write through a link they planted. A
token file others can read is refused. No QEMU: the packages are synthetic.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from drafter.errors import DrafterError
from drafter.network.state import DaemonLock, write_json
from drafter.package import RESOURCES, PackageConfig, Source, open_package, write_package
from drafter.transport import localtoken, security
from drafter.transport.client import RemoteSource
from support.common import as_nobody, assert_one_line_error, dial_as_nobody, run_command
from support.packages import small_package
from support.wire import (
    LOOPBACK,
    build_package,
    contents,
    env_without_token,
    pull,
    run,
    start_registry,
)

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


# --- item 6: links planted in a directory other users can write to ---------------------


@pytest.fixture
def victim(shared: Path) -> Path:
    """A file of root's that the attacker would like root to overwrite."""
    path = shared / "victim"
    path.write_text("precious\n")
    return path


@pytest.fixture
def open_dir(shared: Path) -> Path:
    """An output or state directory any local user may write to (not sticky)."""
    path = shared / "open"
    path.mkdir()
    path.chmod(0o777)
    return path


def plant(link: Path, target: Path) -> None:
    """As nobody: a symbolic link ``link`` -> ``target``."""
    made = as_nobody("ln", "-s", str(target), str(link))
    assert made.returncode == 0, made.stderr
    assert link.is_symlink() and link.lstat().st_uid != 0


def assert_untouched(victim: Path) -> None:
    assert victim.read_bytes() == b"precious\n", "root wrote through the planted link"


def resources(directory: Path) -> dict[str, Source | Path]:
    files: dict[str, Source | Path] = {}
    for resource in RESOURCES[1:]:
        files[resource] = directory / resource
        files[resource].write_bytes(resource.encode() * 100)
    return files


def test_the_package_writer_follows_no_planted_link(
    shared: Path, open_dir: Path, victim: Path
) -> None:
    package = open_dir / "app.drft"
    # The temporary name the writer would use, and the package's own name.
    plant(open_dir / f".app.drft.{os.getpid()}.tmp", victim)
    plant(package, victim)
    config = PackageConfig(1, 1, "console=ttyS0", "02:00:00:00:00:01")
    files = resources(shared)
    files["memory"] = shared / "memory"
    with open(files["memory"], "wb") as f:
        f.truncate(1 << 20)
    write_package(package, config, files)
    assert_untouched(victim)
    assert not package.is_symlink() and package.lstat().st_uid == 0
    assert mode(package) == 0o600
    open_package(package)  # a whole, readable package


def test_the_state_writer_follows_no_planted_link(open_dir: Path, victim: Path) -> None:
    state = open_dir / "daemon-x.json"
    plant(open_dir / f".daemon-x.json.{os.getpid()}.tmp", victim)
    write_json(state, {"pid": os.getpid()})
    assert_untouched(victim)
    assert not state.is_symlink() and mode(state) == 0o600
    assert state.read_text().strip().startswith("{")


def test_the_daemon_lock_follows_no_planted_link(open_dir: Path, victim: Path) -> None:
    path = open_dir / "daemon-x.lock"
    plant(path, victim)
    lock = DaemonLock(path)
    with pytest.raises(DrafterError) as e:
        lock.acquire()
    assert_untouched(victim)
    assert "\n" not in str(e.value) and "refusing the lock file" in str(e.value)
    # A lock file another user made is refused too (root would write into it).
    path.unlink()
    assert as_nobody("touch", str(path)).returncode == 0
    with pytest.raises(DrafterError, match="not a plain file of this user's"):
        lock.acquire()
    # Once it is gone, the lock is taken as usual.
    path.unlink()
    lock.acquire()
    try:
        assert mode(path) == 0o600 and path.read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


# --- item 1: a server started without a token -------------------------------------


def test_other_users_cannot_use_a_registry_started_without_a_token(
    shared: Path, local_token_file: Path
) -> None:
    """The seed's workstation way, no token anywhere: root's own client pulls, as
    before; another account is refused at the handshake and cannot read the host-local
    token the server asks for."""
    package = build_package(shared)
    reg = start_registry("--package-path", str(package), "--laddr", f"{LOOPBACK}:0",
                         env=env_without_token(), stderr_path=shared / "reg.err")  # fmt: skip
    try:
        raddr = f"{LOOPBACK}:{reg.port}"
        expected = contents(package)

        async def root_pulls() -> None:
            source = RemoteSource(raddr)
            await source.connect()
            try:
                assert await pull(source, expected) == expected
            finally:
                await source.close()

        run(root_pulls())
        nobody = dial_as_nobody(raddr)
        assert nobody.returncode == 3, nobody.stdout + nobody.stderr
        assert "requires a token (this user cannot read" in nobody.stdout
        assert "Traceback" not in nobody.stderr
        assert as_nobody("cat", str(local_token_file)).returncode != 0
        assert mode(local_token_file) == 0o600 and mode(local_token_file.parent) == 0o700
        # An account that made a host-local token of its own is refused all the same.
        own = shared / "nobody"
        own.mkdir(mode=0o777)
        own.chmod(0o777)
        env = {localtoken.LOCAL_TOKEN_ENV: str(own / "drafter" / "local-token")}
        made = "from drafter.transport import localtoken as t; t.for_serving()"
        theirs = as_nobody(sys.executable, "-c", made, env=env)
        assert theirs.returncode == 0, theirs.stderr
        nobody = dial_as_nobody(raddr, **env)
        assert nobody.returncode == 3 and "wrong or missing token" in nobody.stdout, nobody
    finally:
        assert reg.stop(signal.SIGTERM) == 0
    assert "Traceback" not in reg.stderr()


def test_the_host_local_token_is_made_once_and_never_read_through_a_link(
    open_dir: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = open_dir / "mine"
    monkeypatch.setenv(localtoken.LOCAL_TOKEN_ENV, str(mine / "local-token"))
    first = localtoken.for_serving()
    assert localtoken.for_serving() == first == localtoken.for_dialing()
    assert mode(mine) == 0o700 and mode(mine / "local-token") == 0o600
    # A link planted where the token would be: refused, and the file it names is
    # neither read nor written.
    monkeypatch.setenv(localtoken.LOCAL_TOKEN_ENV, str(open_dir / "local-token"))
    plant(open_dir / "local-token", victim)
    with pytest.raises(DrafterError, match="is a link"):
        localtoken.for_serving()
    assert localtoken.for_dialing() is None
    assert_untouched(victim)
    # A token file another user made, or one others may read, is not used.
    (open_dir / "local-token").unlink()
    monkeypatch.setenv(localtoken.LOCAL_TOKEN_ENV, str(open_dir / "theirs" / "local-token"))
    (open_dir / "theirs").mkdir()
    (open_dir / "theirs" / "local-token").write_text(security.new_token())
    (open_dir / "theirs" / "local-token").chmod(0o644)
    with pytest.raises(DrafterError, match="not a file only you can read"):
        localtoken.for_serving()
    # A directory others may write to (a planted or shared one) is not used to make one.
    monkeypatch.setenv(localtoken.LOCAL_TOKEN_ENV, str(open_dir / "new-token"))
    with pytest.raises(DrafterError, match="is not yours alone"):
        localtoken.for_serving()
