"""Progress display for long work: a spinner per step on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

log = logging.getLogger("drafter")


class Steps:
    """Named steps of a long job, each shown while it runs and timed when it ends."""

    def __init__(self, quiet: bool = False) -> None:
        self.console = Console(stderr=True)
        self.live = sys.stderr.isatty() and not quiet
        self.quiet = quiet

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        if self.live:
            with self.console.status(name + " ..."):
                yield
        else:
            log.debug("%s ...", name)
            yield
        self._done(name, time.monotonic() - start)

    def skip(self, name: str) -> None:
        self._done(name, None)

    def _done(self, name: str, seconds: float | None) -> None:
        if self.quiet:
            return
        suffix = "" if seconds is None else f" ({seconds:.1f}s)"
        if self.live:
            self.console.print(f"[green]✓[/green] {name}{suffix}", highlight=False)
        else:
            log.info("done: %s%s", name, suffix)
