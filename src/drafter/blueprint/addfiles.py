"""Files of the user's put into the guest at blueprint time
(``drafter-blueprint --add-file HOST:GUEST``): a server jar, a config, a data set.

A file is named by its content (BLAKE3) in the blueprint's cache key, so changing it
rebuilds the root file system and nothing else. It is written from inside the guest
tree (``chroot``), so a link in the tree resolves inside the tree, never on the host,
and it replaces what was at its place, a link included, in one rename (a directory
there is not replaced: the install fails).
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import blake3

from drafter.errors import DrafterError

_READ = 1 << 20
# Where a file would vanish at boot or write into the kernel's view, not onto the disk.
_REFUSED = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/run", "/var/lock")
# Run in the guest tree: $1 the path, $2 the octal mode; the bytes come on stdin.
_INSTALL = (
    'set -e; umask 077; mkdir -p -- "$(dirname -- "$1")"; tmp="$1.drafter-add"; '
    'rm -f -- "$tmp"; cat > "$tmp"; chmod "$2" "$tmp"; mv -fT -- "$tmp" "$1"'
)


@dataclass(frozen=True)
class AddedFile:
    host: Path  # the file on the host, as given
    guest: str  # its absolute path in the guest
    mode: int  # its permission bits in the guest (the host file's, without set-id bits)
    digest: str  # BLAKE3 of its content, hex: part of the cache key


def _open_regular(path: Path, flag: str) -> int:
    """A descriptor of the regular file ``path``; DrafterError for anything else."""
    try:
        # O_NONBLOCK: a FIFO given by mistake is refused, not waited on.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise DrafterError(f"{flag}: cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DrafterError(f"{flag}: {path} is not a regular file")
    return fd


def _digest(fd: int, sink: IO[bytes] | None = None) -> str:
    """BLAKE3 of what ``fd`` holds from its start; each piece also to ``sink.write``."""
    hasher = blake3.blake3()
    os.lseek(fd, 0, os.SEEK_SET)
    while piece := os.read(fd, _READ):
        hasher.update(piece)
        if sink is not None:
            sink.write(piece)
    return hasher.hexdigest()


def check_guest_path(guest: str, flag: str = "--add-file") -> str:
    """``guest`` if it is a plain absolute path a file may be written to; else
    DrafterError."""
    if not guest.startswith("/") or any(c in guest for c in "\0\n"):
        raise DrafterError(f"{flag}: the guest path must be absolute: {guest!r}")
    parts = guest.split("/")[1:]
    if any(part in ("", ".", "..") for part in parts):
        raise DrafterError(
            f"{flag}: the guest path {guest!r} must name a file, without '.', '..' or '//'"
        )
    path = str(PurePosixPath(guest))
    for refused in _REFUSED:
        if path == refused or path.startswith(refused + "/"):
            raise DrafterError(f"{flag}: {refused} is not kept on the VM's disk: {guest!r}")
    return path


def parse(spec: str, flag: str = "--add-file") -> AddedFile:
    """``HOST:GUEST`` (the last ':' splits them) as an AddedFile, its content hashed;
    DrafterError (one line) for a bad spec, a missing or unreadable file, or one that
    is not a regular file."""
    host, sep, guest = spec.rpartition(":")
    if not sep or not host or not guest:
        raise DrafterError(f"{flag} takes HOST_PATH:GUEST_PATH, not {spec!r}")
    guest = check_guest_path(guest, flag)
    fd = _open_regular(Path(host), flag)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode) & 0o777
        return AddedFile(Path(host), guest, mode, _digest(fd))
    except OSError as e:
        raise DrafterError(f"{flag}: cannot read {host}: {e.strerror}") from None
    finally:
        os.close(fd)


def parse_all(specs: list[str], flag: str = "--add-file") -> list[AddedFile]:
    """Every spec parsed; two files for one guest path are refused."""
    files = [parse(spec, flag) for spec in specs]
    seen: set[str] = set()
    for f in files:
        if f.guest in seen:
            raise DrafterError(f"{flag}: {f.guest} is given twice")
        seen.add(f.guest)
    return files


def install(tree: Path, files: list[AddedFile]) -> None:
    """Write ``files`` into the guest ``tree`` (owned by root); DrafterError if one
    changed since it was hashed (the cache key would not name it) or cannot be
    written."""
    for f in files:
        fd = _open_regular(f.host, "--add-file")
        try:
            proc = subprocess.Popen(
                ["chroot", str(tree), "/bin/sh", "-c", _INSTALL, "sh", f.guest, f"{f.mode:o}"],
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert proc.stdin is not None
            try:
                digest = _digest(fd, proc.stdin)
            except BrokenPipeError:
                digest = ""  # the shell stopped early: its error says why
            finally:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            if proc.wait() != 0:
                tail = (err.strip().splitlines() or ["no output"])[-1]
                raise DrafterError(f"--add-file: cannot write {f.guest} in the guest: {tail}")
        finally:
            os.close(fd)
        if digest != f.digest:
            raise DrafterError(f"--add-file: {f.host} changed while the blueprint was built")
