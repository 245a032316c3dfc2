"""The right to run a VM: a lease record beside its checkpoints, so that at most one
copy runs in the whole cluster, partitions included, without a human.

The record (``PREFIX/lease``) holds an epoch, the holder's name and the lease time.
The holder renews it with a conditional replace (``If-Match`` the version it wrote
last) every quarter of the lease time. Every state change is one of these:

- ``UNHELD`` -> ``HOLDING``: :meth:`Lease.acquire` creates the record (epoch 1) or,
  if there is one, watches it: only once its version has not changed for a whole lease
  time (on this host's clock) does it replace it with the epoch raised by one. A
  released record is taken at once.
- ``HOLDING`` -> ``HOLDING``: a renewal succeeded; the holder may run until
  ``sent + (1 - MARGIN) * duration``, where ``sent`` is when that renewal was sent.
- ``HOLDING`` -> ``EXPIRED``: no renewal succeeded before that deadline (the store is
  away). The VM must pause and its address close: a recoverer may take over soon. A
  later renewal that succeeds (the lease was not taken) goes back to ``HOLDING``.
- ``HOLDING`` / ``EXPIRED`` -> ``FENCED``: a renewal's condition failed: someone else
  holds the lease now. This copy must stop for good; nothing it writes can commit.
- ``HOLDING`` -> ``RELEASED``: :meth:`Lease.release`, or a hand-over to a named
  destination (:meth:`Lease.hand_over`).

Why two copies never run at once: the holder's deadline counts from when it *sent*
its last successful renewal; the recoverer's wait counts from when it *saw* that
renewal's version, which is later, and lasts a whole lease time, not
``1 - MARGIN`` of it. The assumption is that the two hosts' clocks run at about the
same rate (within ``MARGIN``, 20 %: far more than real clocks drift), not that they
agree on the time; and that the holder pauses its VM within the margin
(``MARGIN * duration``, 3 s at the default 15 s).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from drafter.checkpoint.records import Record, RecordConflict, Records
from drafter.errors import DrafterError
from drafter.objects.source import StoreError

log = logging.getLogger(__name__)

LEASE = "lease"
DEFAULT_DURATION = 15.0
MARGIN = 0.2
MIN_DURATION, MAX_DURATION = 2.0, 3600.0


class LeasePhase(enum.Enum):
    UNHELD = "unheld"
    HOLDING = "holding"
    EXPIRED = "expired"  # could not renew in time: pause, a recoverer may take over
    FENCED = "fenced"  # someone else took it: stop for good
    RELEASED = "released"


class LeaseFenced(DrafterError):
    """Another holder took the lease: this copy must stop and write nothing more."""


class LeaseHeld(DrafterError):
    """The lease is held by another holder and was not to be waited for."""


@dataclass(frozen=True)
class LeaseRecord:
    epoch: int
    holder: str
    duration: float
    released: bool = False
    to: str | None = None  # a hand-over names the next holder

    def to_bytes(self) -> bytes:
        doc = {"epoch": self.epoch, "holder": self.holder, "duration": self.duration,
               "released": self.released, "to": self.to}  # fmt: skip
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> LeaseRecord:
        """A record read from the store: checked, never believed blindly."""
        try:
            doc = json.loads(data)
            epoch, holder, duration = doc["epoch"], doc["holder"], doc["duration"]
            released, to = doc.get("released", False), doc.get("to")
        except (ValueError, TypeError, KeyError, RecursionError):
            raise DrafterError(f"{where}{LEASE} is not a lease record") from None
        if (
            type(epoch) is not int
            or not 0 < epoch < 1 << 62
            or not isinstance(holder, str)
            or not 0 < len(holder) <= 256
            or type(duration) not in (int, float)
            or not MIN_DURATION <= duration <= MAX_DURATION
            or type(released) is not bool
            or not (to is None or (isinstance(to, str) and 0 < len(to) <= 256))
        ):
            raise DrafterError(f"{where}{LEASE} is not a lease record")
        return cls(epoch, holder, float(duration), released, to)


def holder_name() -> str:
    """This process, for the record and for people reading it."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


class Lease:
    """One holder's view of a VM's lease in ``records``."""

    def __init__(
        self,
        records: Records,
        holder: str | None = None,
        duration: float = DEFAULT_DURATION,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if not MIN_DURATION <= duration <= MAX_DURATION:
            raise DrafterError(
                f"a lease time must be between {MIN_DURATION:g} and {MAX_DURATION:g} seconds"
            )
        self.records = records
        self.holder = holder or holder_name()
        self.duration = duration
        self.phase = LeasePhase.UNHELD
        self.epoch = 0
        self._clock = clock
        self._sleep = sleep
        self._version: str | None = None
        self._deadline = 0.0

    # -- taking it ---------------------------------------------------------------------

    async def acquire(self, may_wait: bool = True, handed_to: str | None = None) -> int:
        """Hold the lease; its epoch. Waits out a live holder's lease (``may_wait``),
        else DrafterError at once. A record handed over to ``handed_to`` is taken at
        once by that name."""
        if self.phase is not LeasePhase.UNHELD:
            raise DrafterError(f"the lease is {self.phase.value}, not unheld")
        while True:
            try:
                return await self._acquire_once(may_wait, handed_to)
            except StoreError as e:
                if e.lasting:
                    raise
                log.warning("cannot reach the lease (%s); trying again", e)
                await self._sleep(min(self.duration / 4, 5.0))

    async def _acquire_once(self, may_wait: bool, handed_to: str | None) -> int:
        where = self.records.where
        while True:
            sent = self._clock()
            current = await self.records.read(LEASE)
            if current is None:
                record = LeaseRecord(1, self.holder, self.duration)
                try:
                    version = await self.records.create(LEASE, record.to_bytes())
                except RecordConflict:
                    continue  # someone created it meanwhile: watch theirs
                return self._held(record, version, sent)
            seen = LeaseRecord.parse(current.data, where)
            free = seen.released and (seen.to is None or seen.to == handed_to)
            if not free:
                if not may_wait:
                    raise LeaseHeld(f"{where}{LEASE} is held by {seen.holder} (epoch {seen.epoch})")
                current = await self._outlast(current, seen)
                seen = LeaseRecord.parse(current.data, where)
            record = LeaseRecord(seen.epoch + 1, self.holder, self.duration)
            sent = self._clock()
            try:
                version = await self.records.replace(LEASE, record.to_bytes(), current.version)
            except RecordConflict:
                continue  # renewed or taken meanwhile: start over
            if seen.epoch and not seen.released:
                log.warning("took over the lease of %s (epoch %d, unrenewed for %.0f s)",
                            seen.holder, seen.epoch, seen.duration)  # fmt: skip
            return self._held(record, version, sent)

    async def _outlast(self, current: Record, seen: LeaseRecord) -> Record:
        """Wait until the record stays the same version for a whole lease time (the
        longer of the holder's and ours); the record as last seen."""
        log.info("the lease is held by %s (epoch %d): waiting for it to lapse",
                 seen.holder, seen.epoch)  # fmt: skip
        since = self._clock()
        wait = max(seen.duration, self.duration)
        while True:
            left = since + wait - self._clock()
            if left <= 0:
                return current
            await self._sleep(min(left, wait / 8))
            try:
                now = await self.records.read(LEASE)
            except StoreError as e:
                if e.lasting:
                    raise
                continue  # a missed look: an unchanged version later still counts from since
            if now is None:
                raise DrafterError(f"{self.records.where}{LEASE} vanished while watched")
            if now.version != current.version:
                record = LeaseRecord.parse(now.data, self.records.where)
                if record.released:
                    return now
                current, since = now, self._clock()  # renewed: the holder is alive
                wait = max(record.duration, self.duration)

    def _held(self, record: LeaseRecord, version: str, sent: float) -> int:
        self.epoch = record.epoch
        self._version = version
        self._deadline = sent + (1 - MARGIN) * self.duration
        self.phase = LeasePhase.HOLDING
        log.debug("holding the lease at epoch %d", self.epoch)
        return self.epoch

    # -- keeping it ----------------------------------------------------------------------

    @property
    def deadline(self) -> float:
        """When (this host's monotonic clock) the VM must be paused without a renewal."""
        return self._deadline

    def overdue(self) -> float:
        """Seconds since the deadline passed (negative: before it)."""
        return self._clock() - self._deadline

    def valid(self) -> bool:
        """Whether this copy may run now: held and inside its deadline."""
        return self.phase is LeasePhase.HOLDING and self._clock() < self._deadline

    async def renew(self) -> LeasePhase:
        """One renewal; the phase after it. A store that is away leaves the phase
        HOLDING until the deadline passes (then EXPIRED); a failed condition FENCES."""
        if self.phase not in (LeasePhase.HOLDING, LeasePhase.EXPIRED):
            return self.phase
        assert self._version is not None
        record = LeaseRecord(self.epoch, self.holder, self.duration)
        sent = self._clock()
        # Not past the deadline: a renewal that lands later is too late to count.
        budget = max(0.5, self._deadline - sent) if self.phase is LeasePhase.HOLDING else None
        try:
            write = self.records.replace(LEASE, record.to_bytes(), self._version)
            self._version = await asyncio.wait_for(write, budget)
        except RecordConflict:
            if await self._ours(record):  # a renewal cut short had landed after all
                return await self.renew()
            self.phase = LeasePhase.FENCED
            log.error("the lease was taken over (epoch %d is no longer ours)", self.epoch)
        except (StoreError, TimeoutError) as e:
            if isinstance(e, StoreError) and e.lasting:
                raise
            e = e if isinstance(e, StoreError) else StoreError("the store did not answer in time")
            if self._clock() >= self._deadline and self.phase is LeasePhase.HOLDING:
                self.phase = LeasePhase.EXPIRED
                log.warning("could not renew the lease in time (%s): the VM must pause", e)
            else:
                log.debug("lease renewal failed (%s); %.1f s left", e,
                          self._deadline - self._clock())  # fmt: skip
        else:
            self._deadline = sent + (1 - MARGIN) * self.duration
            if self.phase is LeasePhase.EXPIRED:
                log.warning("renewed the lease again (epoch %d): the VM may run", self.epoch)
            self.phase = LeasePhase.HOLDING
        if self.phase is LeasePhase.HOLDING and self._clock() >= self._deadline:
            self.phase = LeasePhase.EXPIRED
        return self.phase

    async def _ours(self, record: LeaseRecord) -> bool:
        """After a failed condition: whether the record is our own renewal (one whose
        answer was lost); then its version is adopted."""
        try:
            current = await self.records.read(LEASE)
        except StoreError:
            return False
        if current is None or current.data != record.to_bytes():
            return False
        self._version = current.version
        return True

    async def keep(self, changed: Callable[[LeasePhase], object] | None = None) -> LeasePhase:
        """Renew every quarter of the lease time, and at the deadline, until the lease
        is fenced or released; ``changed`` is called with every new phase (EXPIRED:
        pause the VM; HOLDING again: it may run; FENCED: stop for good)."""
        while self.phase in (LeasePhase.HOLDING, LeasePhase.EXPIRED):
            before = self.phase
            phase = await self.renew()
            if phase is not before and changed is not None:
                changed(phase)
            if phase not in (LeasePhase.HOLDING, LeasePhase.EXPIRED):
                break
            pause = self.duration / 4
            if phase is LeasePhase.HOLDING:
                pause = min(pause, max(0.0, self._deadline - self._clock()))
            await self._sleep(pause)
        return self.phase

    def check(self) -> None:
        """Before a commit: LeaseFenced unless this copy still holds a valid lease."""
        if not self.valid():
            raise LeaseFenced(
                f"{self.records.where}{LEASE}: the lease is {self.phase.value} "
                f"(epoch {self.epoch}): this copy writes nothing more"
            )

    @property
    def version(self) -> str | None:
        return self._version

    # -- letting go ----------------------------------------------------------------------

    async def release(self, to: str | None = None) -> None:
        """Give the lease up (to ``to``, a named next holder, or to anyone)."""
        if self.phase is not LeasePhase.HOLDING:
            return
        assert self._version is not None
        record = LeaseRecord(self.epoch, self.holder, self.duration, released=True, to=to)
        try:
            await self.records.replace(LEASE, record.to_bytes(), self._version)
        except RecordConflict:
            held = LeaseRecord(self.epoch, self.holder, self.duration)
            if await self._ours(held):  # a renewal whose answer was lost: release again
                return await self.release(to)
            self.phase = LeasePhase.FENCED
            raise LeaseFenced(
                f"{self.records.where}{LEASE} was taken over before release"
            ) from None
        self.phase = LeasePhase.RELEASED

    async def hand_over(self, to: str) -> None:
        """A live migration's hand-over: the destination ``to`` takes it at once."""
        await self.release(to)
