"""The destination's half of a live migration, over a connection to the source (device
loop): offer, pre-copy rounds, switch-over, hand-over, done; or abort before the VM
ever ran here."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from drafter.chunks import TRACKED
from drafter.device import Device
from drafter.errors import DrafterError
from drafter.migration.messages import (
    KeyShare,
    SwitchOver,
    decode_challenge,
    decode_dirty,
    decode_grant,
    decode_offer,
    decode_suspended,
    encode_call,
    encode_offer_call,
)
from drafter.migration.pagecache import CacheMirror, PageCache
from drafter.snapshot import failpoint, failpoint_delay
from drafter.transport.protocol import MAX_ANSWER, MAX_BODY, ErrorCode, MsgType, RemoteError

if TYPE_CHECKING:
    from drafter.transport.client import RemoteSource

log = logging.getLogger(__name__)


class DestinationPhase(enum.Enum):
    """The destination's phase: it may run the VM only from RUNNING on."""

    CONNECTED = "connected"  # nothing offered yet
    PRECOPY = "pre-copy"  # pulling while the source VM runs
    SWITCHING = "switching over"  # asked the source to pause; waiting for the state
    LOADING = "loading"  # the state is here; the hand-over is asked, not yet granted
    RUNNING = "running"  # granted: the VM is ours (post-copy until everything is here)
    DONE = "done"  # every chunk is here and the source was told: it stops
    FAILED = "failed"  # gave up before running the VM: the source keeps or takes it back
    TAKEN_BACK = "taken back"  # the source resumed the VM itself: this copy must stop


DESTINATION_TRANSITIONS: dict[DestinationPhase, frozenset[DestinationPhase]] = {
    DestinationPhase.CONNECTED: frozenset({DestinationPhase.PRECOPY, DestinationPhase.FAILED}),
    DestinationPhase.PRECOPY: frozenset({DestinationPhase.SWITCHING, DestinationPhase.FAILED}),
    DestinationPhase.SWITCHING: frozenset(
        {DestinationPhase.LOADING, DestinationPhase.FAILED, DestinationPhase.TAKEN_BACK}
    ),
    DestinationPhase.LOADING: frozenset(
        {DestinationPhase.RUNNING, DestinationPhase.FAILED, DestinationPhase.TAKEN_BACK}
    ),
    DestinationPhase.RUNNING: frozenset(
        {DestinationPhase.DONE, DestinationPhase.FAILED, DestinationPhase.TAKEN_BACK}
    ),
    DestinationPhase.DONE: frozenset(),
    DestinationPhase.FAILED: frozenset(),
    DestinationPhase.TAKEN_BACK: frozenset(),
}


def no_migration(error: BaseException) -> bool:
    """Whether the source refused a call because it no longer has the migration (it
    took the VM back): the wire code NO_MIGRATION."""
    return isinstance(error, RemoteError) and error.code == ErrorCode.NO_MIGRATION


class MigrationDestination:
    """The destination's half of a migration, over a connection to the source.

    Runs on the device loop. The caller pulls chunks (``pull_missing``) and runs the
    VM; this object makes the protocol's calls in order and keeps the phase:
    :meth:`precopy`, :meth:`switch_over`, :meth:`hand_over` (then the caller may run
    the VM), :meth:`finish`; or :meth:`abort` before the VM ever ran.
    """

    def __init__(
        self,
        remote: RemoteSource,
        devices: dict[str, Device],
        pull_missing: Callable[[], Awaitable[None]],
        cache: PageCache,
        rounds: int = 5,
        precopy_bytes: int = 8 << 20,
        retry_timeout: float = 30.0,
        handover_timeout: float = 15.0,
    ) -> None:
        self.remote = remote
        self.devices = devices  # every chunk of which the source may challenge
        self.tracked = [devices[name] for name in TRACKED]
        self.pull_missing = pull_missing
        self.mirror = CacheMirror(self.tracked, cache)
        self.rounds = rounds
        self.precopy_bytes = precopy_bytes
        self.retry_timeout = retry_timeout
        # How long the grant may take (through reconnects) before the destination gives
        # the migration up and the source resumes the VM.
        self.handover_timeout = handover_timeout
        self.migration_id = ""
        self._key = b""  # the migration key (the offer's exchange): proves each call ours
        self._seq = 0  # the last call number used: each call, each try, a new one
        self.rounds_done = 0
        self.phases: dict[str, float] = {}  # step -> milliseconds, both sides
        self.told_to_run = False  # set by the caller right before the VM runs here
        # The name this host takes the VM's checkpoint lease under, sent with the
        # hand-over (the source hands the lease to it): None without checkpoints.
        self.lease_holder: str | None = None
        self.on_taken_back: Callable[[], None] | None = None
        self._phase = DestinationPhase.CONNECTED
        self._calls: set[asyncio.Task[Any]] = set()

    @property
    def phase(self) -> DestinationPhase:
        """Whether the VM may run here (from RUNNING on), or must not."""
        return self._phase

    @property
    def cached(self) -> dict[str, dict[int, None]]:
        """Chunks stored into the page cache here, per device, in the order stored."""
        return self.mirror.cached

    def _to(self, new: DestinationPhase) -> None:
        """The one place the phase changes; only along DESTINATION_TRANSITIONS."""
        old = self._phase
        if new not in DESTINATION_TRANSITIONS[old]:
            raise AssertionError(f"migration destination: {old.value} -> {new.value}")
        self._phase = new
        log.debug("migration destination: %s -> %s", old.value, new.value)
        if new is DestinationPhase.TAKEN_BACK:
            log.error("the source has taken the VM back (it resumed it itself)")
            if self.on_taken_back is not None:
                self.on_taken_back()

    def _taken_back(self) -> None:
        """The source refused this migration's id: it has the VM back."""
        if DestinationPhase.TAKEN_BACK in DESTINATION_TRANSITIONS[self._phase]:
            self._to(DestinationPhase.TAKEN_BACK)

    async def _call_until(
        self,
        kind: MsgType,
        deadline: float,
        pause: float,
        timeout: float | None = None,
        max_answer: int = MAX_BODY,
        retry_level: int = logging.DEBUG,
        fields: dict[str, Any] | None = None,
    ) -> bytes:
        """Call ``kind`` naming this migration, asked again after a lost connection
        (once reconnected the source answers the same) until ``deadline``
        (monotonic): no try starts after it, though one may end after it.
        ``timeout`` bounds each try (None: until the deadline). Raises the
        last error at once when the source no longer has the migration, when the
        connection is lost for good, or when it was taken back meanwhile."""
        while True:
            try:
                extra = dict(fields or {})
                if kind is MsgType.MIGRATE_HANDOVER and self.lease_holder is not None:
                    extra["lease_holder"] = self.lease_holder
                body = self.signed(kind, **extra)
                return await self.remote.call(
                    kind,
                    body,
                    timeout=timeout or max(0.1, deadline - time.monotonic()),
                    max_answer=max_answer,
                )
            except DrafterError as e:
                if (
                    no_migration(e)
                    or self.remote.failed
                    or time.monotonic() >= deadline
                    or self._phase is DestinationPhase.TAKEN_BACK
                ):
                    raise
                log.log(retry_level, "%s: %s; asking again", kind.name, e)
                await asyncio.sleep(pause)

    def signed(self, kind: MsgType, **fields: object) -> bytes:
        """The body of a call naming this migration, with a fresh call number and the
        proof that this is the destination that offered it."""
        self._seq += 1
        return encode_call(self._key, kind, self.migration_id, self._seq, **fields)

    async def precopy(self) -> None:
        """Offer the migration, then pull and re-pull what the running VM dirtied."""
        try:
            share = KeyShare()
            body = await self.remote.call(MsgType.MIGRATE_OFFER, encode_offer_call(share))
            self.migration_id, changed, theirs = decode_offer(body)
            self._key = share.key(theirs, self.migration_id)
            self._to(DestinationPhase.PRECOPY)
            self._invalidate(changed)  # changed at the source since it hashed them for us
            for _ in range(max(0, self.rounds)):  # 0 rounds: pure post-copy
                await self.pull_missing()
                if self.rounds_done == 0:
                    await self.mirror.warm(self.remote.hot)
                else:
                    await self.mirror.store_stale()
                dirty = decode_dirty(await self.remote.call(MsgType.DIRTY_LIST))
                self.rounds_done += 1
                dirty_bytes = self._invalidate(dirty)
                log.debug("pre-copy round %d: %d KiB dirtied", self.rounds_done, dirty_bytes >> 10)
                if dirty_bytes <= self.precopy_bytes:
                    break
            if self.rounds > 0:
                await self.pull_missing()
                await self.mirror.store_stale()
        except BaseException:
            if self._phase is not DestinationPhase.FAILED:
                self._to(DestinationPhase.FAILED)
            raise

    async def switch_over(self) -> SwitchOver:
        """Ask the source to pause and send the state (the VM then runs nowhere); the
        chunks it dirtied since the last round are dropped here, to be fetched again."""
        self._to(DestinationPhase.SWITCHING)
        asked = time.monotonic()
        sizes = {d.name: (d.size, d.chunk_size) for d in self.tracked}
        # On an error the phase stays SWITCHING: the caller aborts, so that a source
        # that paused resumes at once (it never handed the VM over). Lost on a cut,
        # not refused: asked again once reconnected, naming the migration.
        body = await self._call_until(
            MsgType.MIGRATE_SUSPENDED,
            time.monotonic() + self.retry_timeout,
            pause=0.05,
            timeout=120,
            max_answer=MAX_ANSWER,
            retry_level=logging.WARNING,
        )
        answer = decode_suspended(body, sizes)
        self.remote.on_reconnect = self._reconnected
        took = (time.monotonic() - asked) * 1000
        self.phases.update(answer.phases)
        self.phases["transfer"] = max(0.0, took - sum(answer.phases.values()))
        patched = self._apply(answer)
        stored = time.monotonic()
        await self.mirror.refresh(answer, patched)
        self.phases["page cache"] = (time.monotonic() - stored) * 1000
        self._to(DestinationPhase.LOADING)
        return answer

    async def hand_over(self) -> None:
        """Ask for the right to run the VM, through reconnects, for ``handover_timeout``
        seconds. Returns once granted; DrafterError if not (the caller must not run the
        VM, and should :meth:`abort`)."""
        failpoint("before-handover")
        await asyncio.sleep(failpoint_delay("before-handover"))
        deadline = time.monotonic() + self.handover_timeout
        try:
            nonce = decode_grant(
                await self._call_until(MsgType.MIGRATE_HANDOVER, deadline, pause=0.05)
            )
        except DrafterError as e:
            if no_migration(e) or self._phase is DestinationPhase.TAKEN_BACK:
                self._taken_back()
                raise DrafterError("the source took the VM back; it runs there") from None
            raise DrafterError(f"the source did not hand the VM over: {e}") from None
        if self._phase is DestinationPhase.LOADING:  # not taken back meanwhile
            for device in self.devices.values():  # before the VM can write a chunk
                device.start_proof(nonce)
            self._to(DestinationPhase.RUNNING)
            return
        raise DrafterError(f"the migration is {self._phase.value}")

    async def abort(self) -> None:
        """Give the migration up before the VM ran here: the source resumes it. Safe to
        call in any phase; does nothing once the VM ran here or it is over."""
        if self._phase in (DestinationPhase.CONNECTED, DestinationPhase.PRECOPY):
            self._to(DestinationPhase.FAILED)  # the source forgets it when we leave
            return
        if self.told_to_run or self._phase not in (
            DestinationPhase.SWITCHING,
            DestinationPhase.LOADING,
            DestinationPhase.RUNNING,
        ):
            return
        if self._phase is DestinationPhase.RUNNING:  # granted: the source refuses an abort
            self._to(DestinationPhase.FAILED)
            log.error(
                "the VM was handed over here but never ran: it stays paused at the source, "
                "which never resumes a handed-over VM by itself; take it back there "
                "(SIGUSR1) once this peer has stopped: no write is lost"
            )
            return
        self._to(DestinationPhase.FAILED)
        deadline = time.monotonic() + self.retry_timeout
        try:
            await self._call_until(MsgType.MIGRATE_ABORT, deadline, pause=0.2, timeout=60)
        except DrafterError as e:
            if no_migration(e):
                return  # the source took it back already
            log.error(
                "could not tell the source to take the VM back (%s): it stays "
                "paused there until the source's rescue timeout or its operator",
                e,
            )
            return
        log.warning("gave the migration up: the VM runs at the source again")

    async def finish(self) -> bool:
        """Every chunk is here: tell the source, through reconnects for
        ``retry_timeout`` seconds (it stops once told); whether it was told."""
        await asyncio.sleep(failpoint_delay("before-done"))
        deadline = time.monotonic() + self.retry_timeout
        try:
            while True:  # a challenge, then DONE with its answers; again if DONE was cut
                body = await self._call_until(
                    MsgType.MIGRATE_CHALLENGE, deadline, pause=0.2, timeout=60
                )
                answers = await asyncio.to_thread(self._answer, body)
                try:
                    await self.remote.call(
                        MsgType.MIGRATE_DONE,
                        self.signed(MsgType.MIGRATE_DONE, answers=answers),
                        timeout=max(0.1, min(60, deadline - time.monotonic())),
                    )
                    break
                except DrafterError as e:
                    if isinstance(e, RemoteError) or time.monotonic() >= deadline:
                        raise
                    await asyncio.sleep(0.2)  # lost on a cut: a new challenge
        except DrafterError as e:
            if no_migration(e):
                self._taken_back()
            elif isinstance(e, RemoteError):  # refused: the proof of possession failed
                log.error("the source refused DONE (its VM stays paused there): %s", e)
            else:
                log.warning("could not tell the source the migration is done: %s", e)
            return False
        for device in self.devices.values():
            device.stop_proof()
        self._to(DestinationPhase.DONE)
        return True

    def _answer(self, body: bytes) -> dict[str, list[str]]:
        """The tags of the challenged chunks as they were at the grant (worker thread);
        DrafterError if one never was here."""
        counts = {name: device.chunks for name, device in self.devices.items()}
        challenge = decode_challenge(body, counts)
        return {
            name: [self.devices[name].proof_tag(index).hex() for index in indices]
            for name, indices in challenge.items()
        }

    def _reconnected(self) -> None:
        """After a lost connection past switch-over: tell the source we are back, so it
        keeps the migration ours instead of resuming the VM itself."""
        if self._phase not in (DestinationPhase.LOADING, DestinationPhase.RUNNING):
            return

        async def resume() -> None:
            try:
                await self.remote.call(MsgType.MIGRATE_RESUME, self.signed(MsgType.MIGRATE_RESUME))
            except DrafterError as e:
                if not no_migration(e):
                    log.warning("could not tell the source we are back: %s", e)
                elif self._phase in (DestinationPhase.LOADING, DestinationPhase.RUNNING):
                    self._taken_back()

        task = asyncio.ensure_future(resume())
        self._calls.add(task)  # referenced until it is done
        task.add_done_callback(self._calls.discard)

    def _apply(self, answer: SwitchOver) -> dict[str, set[int]]:
        """The last dirty chunks: a chunk here takes the runs written since the last
        round; one that is not here becomes whole from them, or is dropped, to be
        fetched again (hashed when it is served on)."""
        dropped: dict[str, list[int]] = {}
        patched: dict[str, set[int]] = {}
        for device in self.tracked:
            inline = answer.inline.get(device.name, {})
            for index in answer.dirty.get(device.name, []):
                runs = inline.get(index)
                if runs is not None and device.local[index]:
                    device.patch(index, runs)
                    patched.setdefault(device.name, set()).add(index)
                    continue
                dropped.setdefault(device.name, []).append(index)
        self._invalidate(dropped)
        for device in self.tracked:
            for index in dropped.get(device.name, []):
                runs = answer.inline.get(device.name, {}).get(index, [])
                whole = len(runs) == 1 and len(runs[0][1]) == device.chunk_length(index)
                if whole:  # (a run starts at 0 or later; one this long is the chunk)
                    device.fill(index, runs[0][1], None)
        return patched

    def _invalidate(self, dirty: dict[str, list[int]]) -> int:
        """Forget the local copy of these chunks; the bytes they hold."""
        total = 0
        for device in self.tracked:
            chunks = dirty.get(device.name, [])
            device.invalidate(chunks)
            self.mirror.changed(device.name, chunks)
            total += len(chunks) * device.chunk_size
        return total
