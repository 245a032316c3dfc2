"""A running VM's checkpoints (docs/checkpoints.md), as a peer or the runner holds
them: the lease on the VM, the checkpointer that commits generations, and the pauses
both need of the VM (main loop).

:meth:`VMCheckpoints.take` runs before the VM starts: it takes the lease (waiting
out a lapsed holder's when it recovers the VM from the prefix) and fences the head.
:meth:`VMCheckpoints.start` runs once the VM runs: the lease is renewed from then
on, and a checkpoint is made as soon as every chunk is local, then every interval.

The VM runs only while nobody holds it paused (:class:`RunGate`): a checkpoint's
pause, or the lease that could not be renewed in time. A lapsed lease also closes the
namespace's address: no client is answered by a copy that a recoverer may replace.
A fenced lease (someone else holds it) stops this copy for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drafter.checkpoint.lease import (
    LEASE,
    MARGIN,
    Lease,
    LeaseFenced,
    LeaseHeld,
    LeasePhase,
    LeaseRecord,
)
from drafter.checkpoint.manifest import HEAD
from drafter.checkpoint.records import ObjectRecords
from drafter.checkpoint.source import CheckpointSource
from drafter.checkpoint.writer import Checkpointer, Opened, open_head
from drafter.device import Device
from drafter.errors import DrafterError
from drafter.network.follow import Follower
from drafter.objects.location import StoreOptions, parse_location
from drafter.snapshot import fsync_file
from drafter.vmm.qemu import QemuMachine

if TYPE_CHECKING:
    from drafter.metrics import Metrics

log = logging.getLogger(__name__)


def store_options(retry_timeout: float, tls_ca: str | None, virtual_hosted: bool) -> StoreOptions:
    return StoreOptions(retry_timeout=retry_timeout, tls_ca=tls_ca, virtual_hosted=virtual_hosted)


async def holds_checkpoints(url: str, options: StoreOptions) -> bool:
    """Whether ``s3://BUCKET/PREFIX`` holds a VM's checkpoints (a head), not a package."""
    location = parse_location(url, "--raddr")
    if location.scheme != "s3":
        return False
    return await ObjectRecords(location, options).read(HEAD) is not None


class RunGate:
    """Who holds the VM paused now; it runs only when nobody does: a checkpoint's
    pause, the lease that lapsed (its namespace's address is closed too, until the
    lease is renewed), a migration's switch-over (recorded by :meth:`paused`: the
    migration paused the VM itself)."""

    def __init__(self, machine: QemuMachine, follow: Follower) -> None:
        self.machine = machine
        self.follow = follow
        self.holds: set[str] = set()
        self._lock = asyncio.Lock()

    async def hold(self, why: str) -> None:
        """``why`` holds the VM paused. Recorded before the pause is asked for: a
        pause cut short (cancelled while QEMU may already have stopped) is undone by
        :meth:`release` like one that completed, never left without a holder."""
        async with self._lock:
            if why in self.holds:
                return
            first = not self.holds
            self.holds.add(why)
            if first:
                await self.machine.pause()
            if why == "lease":
                await asyncio.to_thread(self.follow.left)

    def paused(self, why: str) -> None:
        """Someone else paused the VM (a migration's switch-over): hold it for them."""
        self.holds.add(why)

    async def release(self, why: str) -> bool:
        """``why`` no longer holds the VM; whether it runs now."""
        async with self._lock:
            if why not in self.holds:
                return not self.holds
            self.holds.discard(why)
            if why == "lease" and "migration" not in self.holds:
                await asyncio.to_thread(self.follow.running)
            if not self.holds:
                await self.machine.resume()
            return not self.holds


class _SessionVM:
    """What the checkpointer needs of the peer's VM (drafter.checkpoint.writer)."""

    def __init__(
        self,
        devices: dict[str, Device],
        config: bytes,
        machine: QemuMachine,
        gate: RunGate,
        hot: Callable[[], dict[str, list[int]]],
        busy: Callable[[], str | None],
    ) -> None:
        self.devices = devices
        self.config = config
        self.machine = machine
        self.gate = gate
        self._hot = hot
        self._busy = busy
        self.stopped: Path | None = None  # QEMU stopped; its last state saved here

    async def sync_memory(self) -> None:
        if self.stopped is None:
            await asyncio.to_thread(fsync_file, Path(self.machine.config.memory))

    async def pause_and_save(self, state: Path) -> None:
        if self.stopped is not None:  # the VM stopped after its last suspend: that state
            await asyncio.to_thread(shutil.copyfile, self.stopped, state)
            return
        try:
            await self.gate.hold("checkpoint")
            await self.machine.save_state(state)
        except BaseException:  # cancelled or failed mid-pause: the VM runs on
            await asyncio.shield(self.gate.release("checkpoint"))
            raise

    async def resume(self) -> None:
        if self.stopped is None:
            await self.gate.release("checkpoint")

    def hot(self) -> dict[str, list[int]]:
        return self._hot()

    def busy(self) -> str | None:
        if self.gate.holds:
            return "the VM is paused"
        return self._busy()


class VMCheckpoints:
    """The lease and the checkpoints of one peer's VM under ``url``."""

    def __init__(
        self, url: str, options: StoreOptions, lease_time: float, interval: float, keep: int
    ) -> None:
        self.url = url
        self.records = ObjectRecords(url, options)
        self.lease = Lease(self.records, duration=lease_time)  # not held yet
        self.opened = Opened()
        self.interval = interval
        self.keep = keep
        self.checkpointer: Checkpointer | None = None
        self.gate: RunGate | None = None
        self.fenced: str | None = None  # why this copy must stop, once it must
        self._on_fenced: Callable[[str], None] | None = None
        self._tasks: list[asyncio.Future[Any]] = []
        self._keeper: asyncio.Future[Any] | None = None  # renews the lease
        self._handing = asyncio.Lock()
        self._vm: _SessionVM | None = None
        self._handed_to: str | None = None  # the destination the lease went to

    async def take(self, recovering: bool) -> None:
        """Take the VM's lease (waiting out a lapsed holder's when ``recovering``) and
        fence the head; before the VM starts. A new VM's prefix must hold no other's."""
        records = self.records
        if not recovering and await records.read(HEAD) is not None:
            raise DrafterError(
                f"{records.where} holds the checkpoints of a VM already: resume it with "
                f"--raddr {self.url}, or checkpoint to another prefix"
            )
        try:
            await self.lease.acquire(may_wait=recovering)
        except LeaseHeld as e:
            # No head, a lease: another VM is starting under this prefix, or one died
            # before its first commit. Never waited out: the prefix is not this VM's.
            raise LeaseHeld(
                f"{e}: another VM is being checkpointed to {self.url} (or died before "
                "its first checkpoint); use another prefix"
            ) from None
        self.opened = await open_head(records, self.lease)
        if recovering and self.opened.manifest is None:
            raise DrafterError(f"{records.where}{HEAD} vanished while the lease was taken")

    async def take_handed(self) -> None:
        """A migration to here: the source handed the lease to this holder with the
        grant; take it (at once) and fence the head, before the VM runs here. Only a
        lease released to this holder is taken: not a prefix of another VM."""
        current = await self.records.read(LEASE)
        record = LeaseRecord.parse(current.data, self.records.where) if current else None
        if record is None or not record.released or record.to != self.lease.holder:
            raise DrafterError(
                f"{self.records.where}{LEASE} was not handed to this peer: is --checkpoint "
                "the source's prefix, and does the source checkpoint the VM?"
            )
        await self.lease.acquire(may_wait=False, handed_to=self.lease.holder)
        self.opened = await open_head(self.records, self.lease)
        log.info("took the VM's lease over from the migration's source (epoch %d)",
                 self.lease.epoch)  # fmt: skip

    def source(self) -> CheckpointSource:
        """The latest committed generation, to resume the VM from (recovery)."""
        assert self.opened.manifest is not None
        return CheckpointSource(self.records, self.opened.manifest)

    def describe(self) -> str:
        """What a recovery resumes: the generation and how old it is."""
        manifest = self.opened.manifest
        if manifest is None:
            return f"no checkpoint yet under {self.records.where}"
        age = max(0.0, time.time() - self.opened.committed)
        return (
            f"resuming checkpoint generation {manifest.generation} of {self.records.where}, "
            f"committed {age:.1f} s ago (its VM paused at {manifest.created:.3f})"
        )

    def start(
        self,
        devices: dict[str, Device],
        config: bytes,
        machine: QemuMachine,
        follow: Follower,
        work: Path,
        hot: Callable[[], dict[str, list[int]]],
        busy: Callable[[], str | None],
        pulled: Awaitable[object],
        on_fenced: Callable[[str], None],
        metrics: Metrics | None = None,
    ) -> None:
        """The VM runs: renew the lease from now on, and checkpoint it once ``pulled``."""
        self.gate = RunGate(machine, follow)
        self._on_fenced = on_fenced
        vm = self._vm = _SessionVM(devices, config, machine, self.gate, hot, busy)
        self.checkpointer = Checkpointer(
            self.records, self.lease, vm, work, self.interval, self.keep, opened=self.opened
        )
        self.checkpointer.metrics = metrics
        self.checkpointer.track()
        self._keep_lease()
        run = asyncio.ensure_future(self.checkpointer.run(pulled))
        run.add_done_callback(self._ended)
        self._tasks.append(run)

    def _keep_lease(self) -> None:
        self._keeper = keep = asyncio.ensure_future(self.lease.keep(self._changed))
        keep.add_done_callback(self._ended)
        self._tasks.append(keep)

    # -- a live migration away ------------------------------------------------------------

    async def hold(self) -> None:
        """A migration switches over: wait for a checkpoint under way, start none.
        DrafterError if the lease is not held now (a VM that may not run here must
        not move either)."""
        if self.checkpointer is not None:
            await self.checkpointer.hold()
        if not self.lease.valid():
            self.unhold()
            raise DrafterError(f"the VM's lease is {self.lease.phase.value}: not migrating it")

    def migration_paused(self) -> None:
        """The switch-over paused the VM: it stays paused until the migration lets go."""
        if self.gate is not None:
            self.gate.paused("migration")

    async def migration_released(self) -> bool:
        """The migration let go of the VM here (it failed, or was given up): whether it
        runs again (not while its lease is lapsed or lost: then it stays paused)."""
        if self.gate is None:
            return True
        return await self.gate.release("migration")

    def unhold(self) -> None:
        """The VM runs here again: checkpoints go on."""
        if self.checkpointer is not None:
            self.checkpointer.unhold()

    async def hand_over(self, holder: str | None) -> None:
        """The hand-over: the lease goes to the destination's ``holder`` (before the
        grant). Asked again (a lost answer), the same hand-over is done already."""
        async with self._handing:
            if self.lease.phase is LeasePhase.RELEASED and self._handed_to == holder:
                return
            if holder is None:
                raise DrafterError(
                    "this VM is checkpointed under a lease: start the destination with "
                    f"--checkpoint {self.url}"
                )
            if self._keeper is not None:  # no renewal may race the release
                self._keeper.cancel()
                with contextlib.suppress(BaseException):
                    await self._keeper
            if not self.lease.valid():
                self._keep_lease()
                raise DrafterError(f"the lease is {self.lease.phase.value}: not handing it over")
            try:
                await self.lease.hand_over(holder)
            except BaseException:
                if self.lease.phase is LeasePhase.FENCED:
                    self._fence("the lease was taken over during a migration; stopped this copy")
                else:
                    self._keep_lease()  # still ours: renew it on
                raise
            self._handed_to = holder
            log.info("handed the VM's lease to %s", holder)

    async def take_back(self) -> None:
        """The VM resumes here after the lease was handed over (the destination gave
        the migration up before running it): take the lease back first, by the name it
        was handed to. DrafterError if the destination took it: then the VM must not
        run here."""
        async with self._handing:
            if self._handed_to is None or self.lease.phase is not LeasePhase.RELEASED:
                return
            lease = Lease(self.records, holder=self.lease.holder, duration=self.lease.duration)
            await lease.acquire(may_wait=False, handed_to=self._handed_to)
            opened = await open_head(self.records, lease)
            self.lease, self._handed_to = lease, None
            if self.checkpointer is not None:
                self.checkpointer.adopt(lease, opened)
            self._keep_lease()
            log.warning("took the VM's lease back (epoch %d): it runs here again", lease.epoch)

    def _changed(self, phase: LeasePhase) -> None:
        assert self.gate is not None
        if phase is LeasePhase.EXPIRED:
            log.error("the lease could not be renewed in time: pausing the VM and closing "
                      "its address until the store answers again")  # fmt: skip
            self._spawn(self._pause_lapsed())
        elif phase is LeasePhase.HOLDING:
            self._spawn(self.gate.release("lease"))
        elif phase is LeasePhase.FENCED:
            self._fence(
                f"{self.records.where}lease: another peer took the VM over (this copy's "
                f"epoch {self.lease.epoch} is no longer the lease's); stopped this copy"
            )

    async def _pause_lapsed(self) -> None:
        """Pause the VM whose lease lapsed, and say when the pause came too late for
        comfort: the safety margin (MARGIN of the lease time) must cover it."""
        assert self.gate is not None
        await self.gate.hold("lease")
        late, margin = self.lease.overdue(), MARGIN * self.lease.duration
        if late > margin / 2:
            log.warning("the VM paused %.1f s after its lease's deadline, against a margin "
                        "of %.1f s: this host is too loaded for --lease-time %.0f",
                        late, margin, self.lease.duration)  # fmt: skip
        else:
            log.debug("paused %.0f ms after the lease's deadline", late * 1000)

    def _ended(self, task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, LeaseFenced):
            self._fence(f"{error}; stopped this copy")
        elif error is not None:
            self._fence(f"checkpoints failed: {error}")

    def _fence(self, why: str) -> None:
        if self.fenced is not None:
            return
        self.fenced = why
        if self.gate is not None:  # answer no client from now on
            self._spawn(self.gate.hold("lease"))
        if self._on_fenced is not None:
            self._on_fenced(why)

    def _spawn(self, step: Awaitable[object]) -> None:
        task = asyncio.ensure_future(step)
        task.add_done_callback(_logged)
        self._tasks.append(task)

    def request(self) -> None:
        """A checkpoint at once (SIGUSR2, the API)."""
        if self.checkpointer is not None:
            self.checkpointer.request()

    def status(self) -> str:
        """The last committed checkpoint: its age (what a host loss costs now) and
        its pause."""
        last = self.checkpointer.last if self.checkpointer is not None else None
        if last is None:
            return f"checkpoints: none committed here yet (to {self.records.where})"
        age = time.time() - last.paused_at
        return (
            f"checkpoints: generation {last.generation}, the VM as {age:.1f} s ago, paused "
            f"{last.pause_s * 1000:.0f} ms, {last.uploaded_bytes / (1 << 20):.1f} MiB uploaded; "
            f"lease {self.lease.phase.value} (epoch {self.lease.epoch})"
        )

    async def stop_after_suspend(self, state: Path) -> str | None:
        """The VM was suspended and its QEMU stopped (the runner's write-back), its
        last state in ``state`` and its devices still here: the final checkpoint is
        that VM, exactly; then the lease is released."""
        if self._vm is not None:
            self._vm.stopped = state
        return await self.stop(final=True)

    async def stop(self, final: bool) -> str | None:
        """Stop renewing and checkpointing. ``final`` (a clean stop): one last
        checkpoint with the VM paused for good, then the lease is released, so another
        host may resume the VM at once. What that did, for the user, or None."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self.checkpointer is None and self.lease.phase is LeasePhase.HOLDING:
            with contextlib.suppress(Exception):  # it never ran: free it at once
                await self.lease.release()
            return None
        if not final or self.fenced is not None or self.checkpointer is None:
            return None
        self.checkpointer.unhold()
        if not self.lease.valid():
            return "the lease is not held: no final checkpoint"
        stats = await self.checkpointer.checkpoint(final=True)
        await self.lease.release()
        return (
            f"final checkpoint {stats.generation} committed to {self.records.where} "
            "and the lease released: resume it anywhere with --raddr " + self.url
        )


def _logged(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s", task.exception())
