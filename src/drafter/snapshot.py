"""The VM lifecycle steps every role shares: boot to liveness, suspend, resume.

A snapshot is device state (saved by the VMM) plus the memory file, which the VMM
maps shared and therefore already holds every page the guest wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from drafter.agent_client import AgentClient, wait_for_liveness
from drafter.errors import DrafterError
from drafter.vmm.qemu import QemuMachine

log = logging.getLogger(__name__)


@dataclass
class Timings:
    """Seconds spent in each step, for logs and benchmarks."""

    boot_to_liveness: float = 0.0
    before_suspend: float = 0.0
    pause_and_save: float = 0.0  # pause + save + sync
    pause: float = 0.0
    save: float = 0.0
    sync: float = 0.0
    restore: float = 0.0  # load the state (+ the cont)
    load: float = 0.0
    granted: float = 0.0  # waiting for the right to run (a migration's hand-over)
    cont: float = 0.0
    after_resume: float = 0.0
    paused_at: float = 0.0  # wall clock: when the VM stopped running (suspend)
    resumed_at: float = 0.0  # wall clock: when it ran again (resume)


async def boot_to_liveness(machine: QemuMachine, timeout: float = 300.0) -> float:
    """Boot ``machine`` and wait until the guest application is up; seconds taken."""
    start = time.monotonic()
    await machine.boot()

    async def watchdog() -> None:
        await machine.check_alive()
        panic = _console_panic(machine.console_log)
        if panic:
            raise DrafterError(f"the guest kernel failed: {panic}")

    try:
        await wait_for_liveness(machine.liveness_socket, timeout, watchdog)
    except BaseException:
        await machine.stop()
        raise
    took = time.monotonic() - start
    log.info("guest is live after %.1fs", took)
    return took


def _console_panic(console_log: Path) -> str | None:
    try:
        text = console_log.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if "Kernel panic" in line or "Out of memory" in line:
            return line.strip()
    return None


async def suspend(
    machine: QemuMachine,
    state: Path,
    timings: Timings | None = None,
    presync: bool = False,
    paused: Callable[[], None] | None = None,
) -> None:
    """BeforeSuspend, pause, save device state to ``state``, sync guest memory to disk.
    ``presync`` syncs memory once more before the pause, while the VM still runs, so
    the sync after it (which the pause waits for) only has the last pages to push.
    ``paused``, if given, is called right after the pause (and must not block)."""
    t = timings or Timings()
    start = time.monotonic()
    async with AgentClient(machine.agent_socket) as agent:
        await agent.before_suspend()
    if presync:
        await asyncio.to_thread(fsync_file, Path(machine.config.memory))
    t.before_suspend = time.monotonic() - start
    start = time.monotonic()
    await machine.pause()
    t.paused_at = time.time()
    t.pause = time.monotonic() - start
    if paused is not None:
        paused()
    failpoint("after-pause")
    await machine.save_state(state)
    t.save = time.monotonic() - start - t.pause
    await asyncio.to_thread(fsync_file, Path(machine.config.memory))
    failpoint("after-sync")
    t.pause_and_save = time.monotonic() - start
    t.sync = t.pause_and_save - t.pause - t.save
    log.debug("suspended: %s", t)


async def resume(
    machine: QemuMachine,
    state: Path,
    timings: Timings | None = None,
    granted: Callable[[], Awaitable[None]] | None = None,
    running: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Restore ``machine`` from ``state`` and its memory file, resume, AfterResume.
    ``granted``, if given, is awaited between the load and the resume: the VM runs
    only once it returns (a migration's hand-over); if it raises, the VM never ran.
    ``running`` starts right after the resume, beside AfterResume (the network
    following the VM here)."""
    t = timings or Timings()
    start = time.monotonic()
    await machine.restore(state)
    t.load = time.monotonic() - start
    failpoint("after-load")
    if granted is not None:
        await granted()
    t.granted = time.monotonic() - start - t.load
    await machine.resume()
    t.restore = time.monotonic() - start - t.granted
    t.cont = t.restore - t.load
    t.resumed_at = time.time()
    start = time.monotonic()
    follow = asyncio.ensure_future(running()) if running is not None else None
    try:
        async with AgentClient(machine.agent_socket) as agent:
            await agent.after_resume()
        if follow is not None:
            await follow
    except BaseException:
        if follow is not None and not follow.done():
            follow.cancel()
        await machine.stop()
        raise
    t.after_resume = time.monotonic() - start
    log.debug("resumed: %s", t)


_passes: dict[str, int] = {}  # failpoint -> times this process passed it


def failpoint(name: str) -> None:
    """Fail here if $DRAFTER_FAILPOINTS names ``name`` (comma-separated): how the tests
    make a step fail that cannot be made to fail from outside. ``name:kill`` instead
    kills this process on the spot (SIGKILL), as a crash there would; ``name:kill@N``
    only the N-th time this process passes there."""
    named = os.environ.get("DRAFTER_FAILPOINTS", "").split(",")
    _passes[name] = passes = _passes.get(name, 0) + 1
    if f"{name}:kill" in named or f"{name}:kill@{passes}" in named:
        log.warning("failpoint %s: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)
    if name in named:
        raise DrafterError(f"failpoint {name}")


def failpoint_delay(name: str) -> float:
    """Seconds to wait here if $DRAFTER_FAILPOINTS names ``name:delay=SECONDS`` (0 if
    not): how the tests hold a step back to make a fault land before it."""
    for entry in os.environ.get("DRAFTER_FAILPOINTS", "").split(","):
        if entry.startswith(f"{name}:delay="):
            with contextlib.suppress(ValueError):
                return max(0.0, min(float(entry.split("=", 1)[1]), 60.0))
    return 0.0


def fsync_file(path: Path) -> None:
    """Sync ``path``; for the memory file this pushes the pages the guest dirtied in
    QEMU's shared mapping down to the file (or device) below.

    The sync runs in a child process (coreutils ``sync FILE``), never on a thread of
    this one: the file is usually served by this very process through FUSE, and a
    process killed (SIGKILL) while one of its own threads waits on its own FUSE mount
    can never exit (the thread waits for an answer only the dead server thread could
    give, and the mount stays open while the thread lives). A child's wait ends with
    an error when this process is gone.
    """
    try:
        done = subprocess.run(["sync", "--", str(path)], capture_output=True, text=True)
    except OSError as e:
        raise DrafterError(f"cannot sync {path}: {e.strerror or e}") from None
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise DrafterError(f"cannot sync {path}: {reason[0]}")
