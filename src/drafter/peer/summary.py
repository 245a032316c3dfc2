"""What a peer's start or migration cost, and how far its pull is: plain numbers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class MigrationSummary:
    """What one start or migration cost."""

    source: str = ""
    migrated: bool = False
    rounds: int = 0
    total_s: float = 0.0
    downtime_s: float = 0.0  # the VM paused at the source to running here (wall clocks)
    switch_s: float = 0.0  # switch-over asked to AfterResume done
    precopy_s: float = 0.0  # migration offered to switch-over asked
    moved: dict[str, int] = field(default_factory=dict)  # resource -> bytes fetched
    # Switch-over steps in order, both sides (BeforeSuspend ... first chunk served), ms.
    phases: dict[str, float] = field(default_factory=dict)
    reused: int = 0  # bytes taken from a local package instead of moved
    wire_bytes: int = 0  # chunk payload bytes that crossed the network (compressed)
    cached: int = 0  # bytes taken from the host's chunk cache instead of fetched

    def line(self) -> str:
        """The summary as one line for a log or a terminal."""
        moved = ", ".join(f"{k} {v / (1 << 20):.1f} MiB" for k, v in self.moved.items())
        moved += f"; {self.wire_bytes / (1 << 20):.1f} MiB on the wire"
        if self.reused:
            moved += f", {self.reused / (1 << 20):.1f} MiB reused from a local package"
        if self.cached:
            moved += f", {self.cached / (1 << 20):.1f} MiB from the host's chunk cache"
        if not self.migrated:
            return f"started from {self.source} in {self.total_s * 1000:.0f} ms; moved {moved}"
        return (
            f"migrated from {self.source}: total {self.total_s:.2f}s, downtime "
            f"{self.downtime_s * 1000:.0f} ms (switch-over to AfterResume "
            f"{self.switch_s * 1000:.0f} ms: {self.phase_line()}), {self.rounds} pre-copy "
            f"round(s), moved {moved}"
        )

    def phase_line(self) -> str:
        """The switch-over's steps and their milliseconds, in order."""
        return ", ".join(f"{name} {ms:.0f}" for name, ms in self.phases.items())


@dataclass
class PullProgress:
    """Bytes of the VM's resources local so far, of ``total``; ``finished`` (monotonic
    clock) once every chunk is here."""

    total: int = 0
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
