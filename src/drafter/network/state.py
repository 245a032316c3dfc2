"""The daemon's files under the state directory, and reading them back.

Layout (``state_dir`` defaults to /run/drafter)::

    daemon-{prefix}.lock   flock held by the running daemon for its lifetime
    daemon-{prefix}.json   pid and everything the daemon made (used to clean up after kill -9)
    netns/{namespace}.json what other commands need to know about one namespace
    follow/{address}.json  which namespace holds a stable address now (drafter.network.follow)

Files are written owner-only (0600), and the directories the daemon makes 0700: they
are root's business, and nothing in them is for other users.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from drafter import atomic
from drafter.errors import DrafterError
from drafter.network.namespaces import namespace_exists

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/drafter"


def state_file(state_dir: str | Path, prefix: str) -> Path:
    """Path of the daemon state file for ``prefix``."""
    return Path(state_dir) / f"daemon-{prefix}.json"


def lock_file(state_dir: str | Path, prefix: str) -> Path:
    """Path of the daemon lock file for ``prefix``."""
    return Path(state_dir) / f"daemon-{prefix}.lock"


def info_file(state_dir: str | Path, namespace: str) -> Path:
    """Path of the info file of ``namespace``."""
    return Path(state_dir) / "netns" / f"{namespace}.json"


@dataclass(frozen=True)
class NamespaceInfo:
    """What a managed namespace offers: where the host reaches its VM, and its names."""

    namespace: str
    external_address: str
    host_veth: str
    host_address: str
    namespace_address: str
    guest_address: str
    daemon_pid: int
    # Read by drafter.network.follow; files of older daemons lack them.
    nft_table: str = ""  # the namespace's own table (family ip)
    namespace_veth: str = "veth0"

    def to_dict(self) -> dict[str, Any]:
        """The info as plain JSON-able data (the info file's content)."""
        return asdict(self)


def process_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot; None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces; fields after it are plain.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (and, if given, was started at ``start_time``)."""
    if pid <= 0:
        return False
    started = process_start_time(pid)
    if started is None:
        return False
    return start_time is None or started == start_time


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (rename of a temporary file that no link
    planted beside it can redirect: :mod:`drafter.atomic`)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        atomic.write_file(path, (json.dumps(data, indent=2) + "\n").encode())
    except OSError as e:
        raise DrafterError(f"cannot write {path}: {e.strerror or e}") from None


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if the file does not exist."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DrafterError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise DrafterError(f"cannot read {path}: not a JSON object")
    return data


def unlink(path: Path) -> None:
    """Remove ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class DaemonLock:
    """An exclusive flock on the lock file of one prefix, held while the daemon runs.

    The kernel drops it when the process dies, even by ``kill -9``, so holding it
    proves no other daemon for the prefix is alive.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, owner_hint: str = "") -> None:
        """Take the lock or raise DrafterError if another process holds it."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DrafterError(
                    f"another drafter-daemon{owner_hint} is already running "
                    f"(lock {self.path} is held)"
                ) from None
            # The holder may have removed the file between our open and flock.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)

    def _open(self) -> int:
        """The lock file, made owner-only if new. A link planted at its name is never
        followed, and a file that is not a plain one of ours (another user's, or a hard
        link to something else) is refused: it is truncated and written once locked."""
        refused = DrafterError(
            f"refusing the lock file {self.path}: it is not a plain file of this user's "
            "(a link, or someone else's file); remove it and start again"
        )
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise refused from None
            raise DrafterError(f"cannot open the lock file {self.path}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            os.close(fd)
            raise refused
        return fd

    def release(self, remove: bool = True) -> None:
        """Drop the lock (removing the file first if ``remove``)."""
        if self._fd is None:
            return
        if remove:
            unlink(self.path)
        os.close(self._fd)
        self._fd = None


def namespace_info(name: str, state_dir: str | Path = DEFAULT_STATE_DIR) -> NamespaceInfo:
    """Info about namespace ``name``; DrafterError unless a running daemon manages it."""
    path = info_file(state_dir, name)
    data = read_json(path)
    if data is None:
        raise DrafterError(
            f"network namespace {name!r} is not managed by a drafter-daemon "
            f"(no {path}; is drafter-daemon running with --state-dir {state_dir}?)"
        )
    try:
        optional = ("nft_table", "namespace_veth")
        fields = [k for k in NamespaceInfo.__dataclass_fields__ if k not in optional or k in data]
        info = NamespaceInfo(**{k: data[k] for k in fields})
    except (KeyError, TypeError) as e:
        raise DrafterError(f"cannot read {path}: missing {e}") from None
    if not process_alive(int(info.daemon_pid)):
        raise DrafterError(
            f"network namespace {name!r}: its drafter-daemon (pid {info.daemon_pid}) is not running"
        )
    if not namespace_exists(name):
        raise DrafterError(f"network namespace {name!r} does not exist")
    return info
