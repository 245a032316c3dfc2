"""The host-local token: loopback easy for the operator, closed to every other account.

A server started without ``--token-file`` (or $DRAFTER_TOKEN) listens on loopback
only, where every local user can connect. So it still asks for a token: one made on
first use in a file only its owner can read, ``/run/drafter/local-token`` for root
(``$XDG_RUNTIME_DIR/drafter/local-token`` or ``~/.local/state/drafter/local-token``
for another user; $DRAFTER_LOCAL_TOKEN_FILE names another place). The project's
clients read the same file when they dial a loopback address without a token, so
the operator's commands work as before, while another account, which cannot read
the file, is refused at the handshake like any client with a wrong token.

Only ``--insecure`` serves loopback without it. The file is never read through a
link, nor trusted when another user could read or replace it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from drafter.atomic import create_beside
from drafter.errors import DrafterError
from drafter.transport import security

LOCAL_TOKEN_ENV = "DRAFTER_LOCAL_TOKEN_FILE"
_ROOT_PATH = Path("/run/drafter/local-token")


def path() -> Path:
    """Where this user's host-local token lives."""
    given = os.environ.get(LOCAL_TOKEN_ENV, "").strip()
    if given:
        return Path(given)
    if os.geteuid() == 0:
        return _ROOT_PATH
    runtime = os.environ.get("XDG_RUNTIME_DIR", "").strip()
    base = Path(runtime) if runtime else Path.home() / ".local" / "state"
    return base / "drafter" / "local-token"


def for_serving() -> str:
    """The host-local token, made now if there is none yet; DrafterError (one line)
    if it cannot be made or is not safe to use."""
    where = path()
    try:
        token = _read(where)
        if token is None:
            _make(where)
            token = _read(where)
    except OSError as e:
        raise DrafterError(
            f"cannot use the host-local token {where}: {e.strerror or e} "
            f"(give --token-file, or set ${LOCAL_TOKEN_ENV} to a file of your own)"
        ) from None
    if token is None:
        raise DrafterError(f"the host-local token {where} vanished while it was made")
    return token


def for_dialing() -> str | None:
    """The host-local token if this user can read it, else None (then a server that
    asks for a token refuses the connection, as it should)."""
    with contextlib.suppress(OSError, DrafterError):
        return _read(path())
    return None


def _read(where: Path) -> str | None:
    """The token in ``where``; None if there is no such file. DrafterError if the file
    is not this user's own, or others may read or change it (it is never used then)."""
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link where the file should be
            raise DrafterError(f"the host-local token {where} is a link: remove it") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise DrafterError(
                f"the host-local token {where} is not a file only you can read "
                f"(owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): remove it"
            )
        text = f.read(security.TOKEN_CHARS + 2).decode(errors="replace").strip()
    return security.check_token(text, f"the host-local token {where}")


def _make(where: Path) -> None:
    """A new token at ``where`` unless one appeared meanwhile (then that one stays):
    written whole beside it, then linked in, so no reader sees half a file."""
    where.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(where.parent)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise DrafterError(
            f"the directory of the host-local token, {where.parent}, is not yours alone "
            f"(owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
        )
    fd, tmp = create_beside(where, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write((security.new_token() + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another process made one first
            os.link(tmp, where)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
