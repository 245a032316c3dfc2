"""drafter-token: make a new shared token for drafter-registry and drafter-peer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from drafter import cli
from drafter.errors import DrafterError
from drafter.transport.security import new_token

PROG = "drafter-token"


def write_token(path: Path, force: bool = False) -> None:
    """Write a fresh token to ``path``, readable by its owner only."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise DrafterError(f"{path} exists already (--force replaces it)") from None
    except OSError as e:
        raise DrafterError(f"cannot write {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(new_token() + "\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point of drafter-token."""
    p = cli.parser(
        PROG,
        "Make a shared token (256 random bits) for --token-file; without FILE, print it.",
    )
    p.add_argument("file", nargs="?", help="write the token here (mode 0600)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    a = p.parse_args(argv)
    cli.setup_logging(a.verbose)

    def body() -> int:
        if a.file:
            write_token(Path(a.file), a.force)
            print(f"wrote a new token to {a.file}; give it to every side with --token-file")
        else:
            print(new_token())
        return 0

    return cli.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
