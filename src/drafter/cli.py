"""Shared plumbing for the thin commands: logging, root check, one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from rich.logging import RichHandler

from drafter.errors import DrafterError, NotRootError

log = logging.getLogger("drafter")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every command shares."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--verbose", "-v", action="store_true", help="print debug logs")
    return p


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(show_path=verbose, markup=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler()
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("drafter").setLevel(level)
    # qemu.qmp logs connection attempts we retry on purpose; show them only with -v.
    logging.getLogger("qemu").setLevel(logging.INFO if verbose else logging.CRITICAL)


def require_root(prog: str) -> None:
    if os.geteuid() != 0:
        raise NotRootError(prog)


def run(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command body; turn DrafterError and Ctrl-C into a one-line message."""
    try:
        return body() or 0
    except DrafterError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an unexpected system error still gets one readable line
        where = f": {e.filename}" if e.filename else ""
        print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def boolean(text: str) -> bool:
    """Parse the seed's ``--flag=true|false`` booleans."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_metrics_flags(parser: argparse.ArgumentParser) -> None:
    """``--metrics HOST:PORT`` and ``--metrics-public``, the same on every command
    that serves metrics (:mod:`drafter.metrics`, imported only when they are given)."""
    parser.add_argument(
        "--metrics",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP here (unauthenticated; :PORT = loopback "
        "only); see docs/metrics.md",
    )
    parser.add_argument(
        "--metrics-public",
        action="store_true",
        help="allow --metrics on an address beyond loopback (anyone who reaches it reads "
        "the metrics)",
    )
