"""Replacing a file whole, safely in a directory other users can write to.

The new content goes to a temporary file beside the target, created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` under a name no one can guess (the writer's PID,
which :func:`drafter.vm.remove_stale` reads, then random characters), owner-only.
So a link another user planted is never opened: root never writes into a file of
their choosing. ``rename`` replaces a link at the target itself, never what it points
to; after it, the target must be the very file written, else the write fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from drafter.errors import DrafterError

_TRIES = 16


def create_beside(path: Path, mode: int = 0o600) -> tuple[int, Path]:
    """A new, empty temporary file beside ``path`` (a descriptor open for writing, and
    its name). OSError as ``os.open`` raises it."""
    for _ in range(_TRIES):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, mode)
        except FileExistsError:
            continue  # a name taken by chance, or by someone who guessed it: another
        os.fchmod(fd, mode)  # whatever the umask
        return fd, tmp
    raise DrafterError(f"cannot make a temporary file beside {path}: every name was taken")


def replace_with(fd: int, tmp: Path, path: Path) -> None:
    """Rename ``tmp`` (open as ``fd``, synced by the caller) over ``path`` and sync the
    directory. DrafterError if what is now at ``path`` is not that file (someone
    swapped the temporary name meanwhile)."""
    os.replace(tmp, path)
    ours = os.fstat(fd)
    now = os.lstat(path)
    if (now.st_dev, now.st_ino) != (ours.st_dev, ours.st_ino):
        raise DrafterError(f"{path} was replaced by another file while it was written")
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename)."""
    fd, tmp = create_beside(path, mode)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
            replace_with(fd, tmp, path)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
