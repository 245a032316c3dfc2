"""The source's half of a live migration: a running peer's devices, served so that one
destination at a time can migrate the VM away (device loop).

Each control call is looked up in :data:`HANDLERS` by (phase, kind); a call the
table has no entry for is refused, with the code that says why (:meth:`_refusal`).
One :class:`Migration` record holds what belongs to the migration under way, from its
offer until the source is idle again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drafter import loops
from drafter.chunks import TRACKED, ZERO_HASH, Priority
from drafter.device import Device
from drafter.hashes import chunk_hash, is_zero, proof_tag
from drafter.migration.messages import (
    INLINE_LIMIT,
    INLINE_MARGIN,
    PROOF_CHUNKS,
    TAKEN_BACK,
    KeyShare,
    SwitchOver,
    check_call,
    decode_answers,
    decode_lease_holder,
    decode_offer_call,
    encode_challenge,
    encode_dirty,
    encode_grant,
    encode_offer,
    encode_suspended,
    fingerprint,
)
from drafter.snapshot import failpoint, fsync_file
from drafter.transport.protocol import ErrorCode, MsgType, ProtocolError
from drafter.transport.server import Connection

if TYPE_CHECKING:
    from drafter.metrics import Metrics

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    """The source's phase: who may run the VM is the source until HANDED_OVER."""

    IDLE = "idle"  # no migration; the VM runs here
    PRECOPY = "pre-copy"  # a destination pulls; the VM runs here
    SWITCHING = "switching over"  # BeforeSuspend, pause, state: no other step meanwhile
    SUSPENDED = "suspended"  # paused here, state sent; the destination has not the right
    HANDED_OVER = "handed over"  # the destination may run the VM; this copy never will
    RESCUING = "rescuing"  # resuming the VM here (hand-over provably not done, or asked)
    DONE = "done"  # the destination holds everything; this process stops


SOURCE_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.PRECOPY}),  # an offer
    # the destination left, fell silent, or asks to switch over
    Phase.PRECOPY: frozenset({Phase.IDLE, Phase.SWITCHING}),
    # paused and answered; or a step failed and the VM runs here again
    Phase.SWITCHING: frozenset({Phase.SUSPENDED, Phase.IDLE}),
    # granted; or ABORT, rescue timeout, operator
    Phase.SUSPENDED: frozenset({Phase.HANDED_OVER, Phase.RESCUING}),
    # DONE; or the operator (an abort is refused: the destination may have run it)
    Phase.HANDED_OVER: frozenset({Phase.DONE, Phase.RESCUING}),
    # resumed here; or the resume failed and it stays where it was
    Phase.RESCUING: frozenset({Phase.IDLE, Phase.SUSPENDED, Phase.HANDED_OVER}),
    Phase.DONE: frozenset(),
}

# The calls that name a switched-over migration (its id in the body).
_NAMING = frozenset(
    {
        MsgType.MIGRATE_RESUME,
        MsgType.MIGRATE_HANDOVER,
        MsgType.MIGRATE_ABORT,
        MsgType.MIGRATE_CHALLENGE,
        MsgType.MIGRATE_DONE,
    }
)


class VMControl:
    """What the source needs from the VM, as coroutines on the VM's own event loop (the
    main loop), reached from the device loop through :mod:`drafter.loops`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        suspend: Callable[[], Awaitable[tuple[bytes, float, dict[str, float]]]],
        resume_here: Callable[[], Awaitable[None]],
        finished: Callable[[], None],
        hand_lease: Callable[[str | None], Awaitable[None]] | None = None,
    ) -> None:
        self.loop = loop
        self.suspend = suspend
        self.resume_here = resume_here
        self.finished = finished
        # The VM's checkpoint lease goes to the destination's holder before the grant
        # (None: the VM is not checkpointed); raises if it cannot.
        self.hand_lease = hand_lease

    async def run(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """Run one of the VM's steps on its loop, from the device loop."""

        async def call() -> Any:
            return await make()

        return await loops.run_on(self.loop, call())

    def tell_finished(self) -> None:
        """The migration is done: tell the VM's loop (nothing to wait for)."""
        loops.call_soon(self.loop, self.finished)


@dataclass(eq=False)
class Migration:
    """The migration under way, from its offer until the source is idle again."""

    id: str  # names the migration in every call after the offer (never logged)
    conn: Connection  # the destination's; a reconnect that proves the key adopts its new one
    key: bytes  # the migration key, from the offer's exchange: only the destination has it
    seen: set[int] = field(default_factory=set)  # call numbers used (replays refused)
    offered_at: float = field(default_factory=time.monotonic)
    # The proof of possession: its nonce (sent with the grant) and the chunks challenged
    # (none are served while a challenge is open: they must already be there).
    nonce: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    challenge: dict[str, list[int]] | None = None
    watch: asyncio.Task[None] | None = None  # forgets a destination silent in pre-copy
    # The switch-over's encoded answer, once asked; kept while it may be lost on a cut.
    answer: asyncio.Future[bytes] | None = None
    lost_while_switching: bool = False  # its connection ended while the VM paused
    destination_lost: bool = False  # after switch-over: its connection is gone
    rescue: asyncio.Task[None] | None = None  # resumes here after the grace, if still lost

    def end(self) -> None:
        """The migration is over: its timers do nothing any more."""
        if self.watch is not None and self.watch is not asyncio.current_task():
            self.watch.cancel()
        self.cancel_rescue()

    def cancel_rescue(self) -> None:
        if self.rescue is not None:
            self.rescue.cancel()
            self.rescue = None


Handler = Callable[["MigrationSource", Connection, bytes], Awaitable[bytes]]


class MigrationSource:
    """A ChunkProvider over a running peer's devices that one destination at a time
    can migrate the VM away from, and the ControlHandler of its calls. Runs on the
    device loop."""

    def __init__(
        self,
        devices: dict[str, Device],
        config: bytes,
        memory_file: Path,
        vm: VMControl,
        grace: float | None = 30.0,
        offer_timeout: float = 30.0,
        precopy_timeout: float = 600.0,
    ) -> None:
        self.devices = devices
        self._config = config
        self.memory_file = memory_file
        self.vm = vm
        # After switch-over and before the hand-over, how long a lost destination has to
        # come back before the VM resumes here (None: only when an operator asks).
        self.grace = grace
        # A destination that offered and then falls silent this long loses the migration,
        # so that the next one can migrate the VM.
        self.offer_timeout = offer_timeout
        # A pre-copy that has not switched over this long after its offer ends (one
        # request now and then would hold it, and refuse every other destination, for
        # ever); the VM keeps running here.
        self.precopy_timeout = precopy_timeout
        self.chunk_size = next(iter(devices.values())).chunk_size
        self.metrics: Metrics | None = None  # drafter.metrics: times phases, counts outcomes
        self._phase = Phase.IDLE
        self.migration: Migration | None = None  # from the offer until idle or done
        # What the VM touched after its resume: fixed, or asked for at each connection.
        self.hot_chunks: dict[str, list[int]] | Callable[[], dict[str, list[int]]] = {}

    @property
    def phase(self) -> Phase:
        """Who may run the VM, and which calls are answered (HANDLERS)."""
        return self._phase

    @property
    def migrating(self) -> Connection | None:
        """The destination's connection, while a migration is under way."""
        return self.migration.conn if self.migration is not None else None

    @property
    def migration_id(self) -> str:
        """The id of the migration under way ("" when none)."""
        return self.migration.id if self.migration is not None else ""

    @property
    def destination_lost(self) -> bool:
        """After switch-over: the destination's connection is gone (it may come back)."""
        return self.migration is not None and self.migration.destination_lost

    def _to(self, new: Phase) -> None:
        """The one place the phase changes; only along SOURCE_TRANSITIONS."""
        old = self._phase
        if new not in SOURCE_TRANSITIONS[old]:
            raise AssertionError(f"migration source: {old.value} -> {new.value}")
        self._phase = new
        log.debug("migration source: %s -> %s", old.value, new.value)
        if new in (Phase.IDLE, Phase.DONE) and self.migration is not None:
            self.migration.end()
            self.migration = None
        elif new not in (Phase.SWITCHING, Phase.SUSPENDED) and self.migration is not None:
            self.migration.answer = None  # kept only while it may be lost
        if self.metrics is not None:
            self.metrics.source_phase(old.value, new.value)

    # -- ChunkProvider -------------------------------------------------------------

    def manifest(self) -> dict[str, int]:
        # No "state": it only exists at switch-over. That tells clients "a peer".
        return {name: d.size for name, d in self.devices.items()}

    def config(self) -> bytes:
        return self._config

    async def read_chunk(self, resource: str, index: int) -> tuple[bytes, bytes | None]:
        if self.migration is not None and self.migration.challenge is not None:
            raise ProtocolError(
                ErrorCode.REFUSED, "no chunk is served while the destination proves it has them"
            )
        device = self.devices[resource]
        await device.ensure_chunk(index, Priority.DEMAND)  # a chain: may still be pulling
        return device.read_chunk(index)

    async def hashes(self, resource: str) -> list[bytes]:
        """Every chunk's hash; chunks changed here since they were hashed are read again."""
        device = self.devices[resource]

        def compute() -> list[bytes]:
            out = []
            for index, known in enumerate(device.hashes):
                if known is None:
                    data, known = device.read_chunk(index)
                    if known is None:
                        known = chunk_hash(data)
                out.append(known)
            return out

        return await asyncio.to_thread(compute)

    def hot(self) -> dict[str, list[int]]:
        hot = self.hot_chunks
        return dict(hot() if callable(hot) else hot)

    # -- ControlHandler ------------------------------------------------------------

    async def control(self, conn: Connection, kind: int, body: bytes) -> bytes:
        """One control call of a destination, by the phase and the call's kind."""
        handler = HANDLERS.get((self._phase, kind))
        if handler is None:
            raise self._refusal(kind)
        return await handler(self, conn, body)

    def _refusal(self, kind: int) -> ProtocolError:
        """Why a call the phase has no handler for is refused."""
        if kind == MsgType.MIGRATE_OFFER:
            return ProtocolError(ErrorCode.BUSY, f"a migration is already {self.phase.value}")
        if kind in (MsgType.DIRTY_LIST, MsgType.MIGRATE_SUSPENDED):
            return ProtocolError(ErrorCode.REFUSED, f"not possible while {self.phase.value}")
        if kind in _NAMING:
            return ProtocolError(ErrorCode.NO_MIGRATION, TAKEN_BACK)
        return ProtocolError(ErrorCode.REFUSED, f"unknown control call {kind}")

    def connection_closed(self, conn: Connection) -> None:
        migration = self.migration
        if migration is None or conn is not migration.conn:
            return
        if self.phase is Phase.SWITCHING:
            migration.lost_while_switching = True
            return
        if self.phase is Phase.PRECOPY:
            log.warning("the destination left before switch-over; the VM keeps running here")
            self._to(Phase.IDLE)
            return
        if self.phase not in (Phase.SUSPENDED, Phase.HANDED_OVER):
            return
        migration.destination_lost = True
        if self.phase is Phase.HANDED_OVER:
            log.warning(
                "lost the destination after the hand-over: the VM is its own now; waiting "
                "for it to come back (SIGUSR1 takes the VM back here, losing the writes "
                "it took since the hand-over)"
            )
        elif self.grace is None:
            log.warning(
                "lost the destination before the hand-over; waiting for it to come back "
                "(SIGUSR1 resumes the VM here, no write is lost)"
            )
        elif migration.rescue is None:
            log.warning(
                "lost the destination before the hand-over; waiting %.0fs for it to come back",
                self.grace,
            )
            migration.rescue = asyncio.ensure_future(self._rescue(migration, self.grace))

    # -- the calls, one handler each ------------------------------------------------

    async def _offer(self, conn: Connection, body: bytes) -> bytes:
        theirs = decode_offer_call(body)
        share, migration_id = KeyShare(), secrets.token_hex(16)
        key = share.key(theirs, migration_id)  # before anything changes: may refuse
        self._to(Phase.PRECOPY)
        migration = self.migration = Migration(migration_id, conn, key)
        # What changed since it was last collected, the destination's hashes of it
        # included: it must not trust those. From now on, dirty means "since the offer".
        dirty = await self._collect_dirty()
        log.info(
            "migration %s offered: pre-copy starts; the VM keeps running",
            fingerprint(migration.id),
        )
        migration.watch = asyncio.ensure_future(self._watch_precopy(migration))
        return encode_offer(migration.id, dirty, share)

    async def _dirty_list(self, conn: Connection, body: bytes) -> bytes:
        self._expect(conn)
        return encode_dirty(await self._collect_dirty())

    async def _switch_over_call(self, conn: Connection, body: bytes) -> bytes:
        migration = self._expect(conn)
        answer = migration.answer = asyncio.get_running_loop().create_future()
        try:
            encoded = encode_suspended(await self._switch_over(migration))
        except Exception as e:
            answer.set_exception(e)
            answer.exception()  # retrieved: whoever asked again gets it too
            raise
        except BaseException:
            answer.cancel()
            raise
        answer.set_result(encoded)
        return encoded

    async def _answer_again(self, conn: Connection, body: bytes) -> bytes:
        """Asked again, naming the migration: the destination lost the answer on a cut.
        The same answer again, once the switch-over has it."""
        migration = self.migration
        if migration is None or migration.answer is None:  # (a rescue that failed)
            raise ProtocolError(ErrorCode.REFUSED, f"not possible while {self.phase.value}")
        check_call(migration.key, MsgType.MIGRATE_SUSPENDED, migration.id, migration.seen, body)
        encoded = await asyncio.shield(migration.answer)
        self._adopt(conn, None, Phase.SUSPENDED)
        log.info("the destination of migration %s asked again", fingerprint(migration.id))
        return encoded

    async def _destination_back(self, conn: Connection, body: bytes) -> bytes:
        """The destination came back after a lost connection: it owns the migration
        again, and the source must not resume the VM itself."""
        migration = self._adopt(conn, (MsgType.MIGRATE_RESUME, body), *_AWAY)
        log.info("the destination of migration %s is back", fingerprint(migration.id))
        return b""

    async def _hand_over(self, conn: Connection, body: bytes) -> bytes:
        """The destination has the state and asks for the right to run the VM. Asked
        again (its answer was lost), the grant is given again."""
        self._adopt(conn, (MsgType.MIGRATE_HANDOVER, body), *_AWAY)
        if self.phase is Phase.SUSPENDED:
            hand_lease = self.vm.hand_lease
            if hand_lease is not None:
                holder = decode_lease_holder(body)
                try:
                    await self.vm.run(lambda: hand_lease(holder))
                except Exception as e:
                    log.error("cannot hand the VM's lease over: %s", e)
                    raise ProtocolError(ErrorCode.REFUSED, f"the lease: {e}") from None
            self._to(Phase.HANDED_OVER)
            log.info("handed the VM over: it runs at the destination from now on")
        failpoint("after-handover")
        assert self.migration is not None
        return encode_grant(self.migration.nonce)

    async def _abort(self, conn: Connection, body: bytes) -> bytes:
        """The destination gives up before it ran the VM: it runs here again."""
        self._adopt(conn, (MsgType.MIGRATE_ABORT, body), Phase.SUSPENDED)
        log.warning("the destination gave the migration up before running the VM")
        await self._resume_here("the destination did not run it; no write is lost")
        return b""

    async def _abort_refused(self, conn: Connection, body: bytes) -> bytes:
        """After the grant the destination may have run the VM: resuming it here could
        make two copies run. Refused; it stays paused here (its operator may take it
        back once the destination is gone)."""
        migration = self._adopt(conn, (MsgType.MIGRATE_ABORT, body), Phase.HANDED_OVER)
        log.error(
            "the destination of migration %s asked to abort after the hand-over: refused "
            "(it may have run the VM); the VM stays paused here",
            fingerprint(migration.id),
        )
        raise ProtocolError(
            ErrorCode.REFUSED,
            "the VM was handed over and may have run at the destination: not resuming it "
            "at the source",
        )

    async def _challenge(self, conn: Connection, body: bytes) -> bytes:
        """The destination says it holds every chunk: a few of them, at random among
        those that are not all zero, whose tags it must answer with its DONE. No chunk is
        served meanwhile, so it cannot fetch them now."""
        migration = self._adopt(conn, (MsgType.MIGRATE_CHALLENGE, body), Phase.HANDED_OVER)
        migration.challenge = {}  # (already: no chunk served while it is chosen)
        migration.challenge = await asyncio.to_thread(self._choose_challenge)
        return encode_challenge(migration.challenge)

    def _choose_challenge(self) -> dict[str, list[int]]:
        """PROOF_CHUNKS non-zero chunks of each device, at random. Chunks are drawn at
        random and kept if not zero, so only about as many are looked at as are
        chosen (a chunk changed here is read to tell); a device of mostly zeros is
        scanned for the rest."""
        chosen: dict[str, list[int]] = {}
        pick = secrets.SystemRandom()
        for name, device in self.devices.items():
            found: list[int] = []
            tried: set[int] = set()
            while len(found) < PROOF_CHUNKS and len(tried) < min(device.chunks, 8 * PROOF_CHUNKS):
                index = pick.randrange(device.chunks)
                if index not in tried:
                    tried.add(index)
                    if not self._zero(device, index):
                        found.append(index)
            if len(found) < PROOF_CHUNKS and len(tried) < device.chunks:
                rest = [
                    i for i in range(device.chunks) if i not in tried and not self._zero(device, i)
                ]
                found += pick.sample(rest, min(PROOF_CHUNKS - len(found), len(rest)))
            chosen[name] = found
        return chosen

    @staticmethod
    def _zero(device: Device, index: int) -> bool:
        known = device.hashes[index]
        if known is not None or not device.local[index] and device.source is not None:
            return known == ZERO_HASH  # (a chunk still missing here: by its hash)
        return is_zero(device.read_chunk(index)[0])

    async def _done(self, conn: Connection, body: bytes) -> bytes:
        """DONE answers the challenge: the source stops its VM only if every tag is
        that of its own bytes; else it keeps the VM (paused: it is the destination's)."""
        migration = self.migration
        assert migration is not None  # (HANDED_OVER)
        doc = check_call(migration.key, MsgType.MIGRATE_DONE, migration.id, migration.seen, body)
        self._adopt(conn, None, Phase.HANDED_OVER)
        challenge, migration.challenge = migration.challenge, None  # chunks served again
        if not challenge:
            raise ProtocolError(ErrorCode.REFUSED, "DONE without a challenge answered")
        answers = decode_answers(doc, challenge)
        wrong = None if answers is not None else "the answers do not fit the challenge"
        for name, indices in challenge.items():
            for index, tag in zip(indices, answers[name] if answers else [], strict=True):
                data, _ = await self.read_chunk(name, index)
                if wrong is None and not hmac.compare_digest(tag, proof_tag(migration.nonce, data)):
                    wrong = f"chunk {name} {index} is not the source's"
        if wrong is not None:
            log.error(
                "the destination of migration %s failed its proof of possession (%s): the VM "
                "stays here, paused (it was handed over)",
                fingerprint(migration.id),
                wrong,
            )
            raise ProtocolError(ErrorCode.REFUSED, f"proof of possession failed: {wrong}")
        self._to(Phase.DONE)
        log.info("the destination holds everything and runs the VM")
        self.vm.tell_finished()
        return b""

    # -- steps -----------------------------------------------------------------------

    async def _collect_dirty(self, sync: bool = True) -> dict[str, list[int]]:
        """The chunks written since the last collection; ``sync`` first pushes the pages
        the running guest dirtied in QEMU's mapping down to the devices."""
        if sync:
            await asyncio.to_thread(fsync_file, self.memory_file)
        return {name: sorted(self.devices[name].take_dirty()) for name in TRACKED}

    async def _switch_over(self, migration: Migration) -> SwitchOver:
        self._to(Phase.SWITCHING)  # the offer watchdog and other offers keep off
        migration.lost_while_switching = False
        try:
            state, paused_at, phases = await self.vm.run(self.vm.suspend)
        except Exception as e:
            # The suspend resumed the VM here itself (AfterResume included) if it paused.
            log.error("switch-over failed, the VM keeps running here: %s", e)
            self._to(Phase.IDLE)
            raise ProtocolError(ErrorCode.REFUSED, f"switch-over failed: {e}") from None
        start = time.monotonic()
        try:
            failpoint("before-answer")
            # The suspend synced memory after the pause (and QEMU flushes the disk when
            # it pauses): nothing more to push, no second sync in the downtime.
            runs = {name: self.devices[name].take_dirty_runs() for name in TRACKED}
            dirty = {name: sorted(chunks) for name, chunks in runs.items()}
            # The pages written since the last round, as many as the answer may carry
            # (a client that takes PART frames: up to INLINE_LIMIT), so the
            # destination's VM faults on none.
            limit = min(INLINE_LIMIT, migration.conn.answer_limit)
            inline = self._inline(runs, limit - INLINE_MARGIN - len(state))
        except Exception as e:
            log.error("switch-over failed after the pause (%s); resuming the VM here", e)
            try:
                await self.vm.run(self.vm.resume_here)
            finally:
                self._to(Phase.IDLE)
            raise ProtocolError(ErrorCode.REFUSED, f"switch-over failed: {e}") from None
        phases["final dirty set"] = (time.monotonic() - start) * 1000
        self._to(Phase.SUSPENDED)
        log.info("switched over: the VM is paused here, the destination loads it")
        if migration.lost_while_switching:  # the answer will not arrive: as if lost now
            self.connection_closed(migration.conn)
        return SwitchOver(dirty, paused_at, phases, state, inline)

    def _inline(
        self, runs: dict[str, dict[int, list[tuple[int, int]]]], budget: int
    ) -> dict[str, dict[int, list[tuple[int, bytes]]]]:
        """The bytes written in the dirty chunks since the last round, chunk by chunk
        while they fit in ``budget``, memory first: sent with the state, so the
        destination's VM does not fault on them over the link."""
        inline: dict[str, dict[int, list[tuple[int, bytes]]]] = {}
        for name in TRACKED:
            device = self.devices[name]
            for index, chunk_runs in sorted(runs.get(name, {}).items()):
                size = sum(length for _, length in chunk_runs)
                if size > budget or not device.local[index]:
                    continue
                inline.setdefault(name, {})[index] = device.read_runs(index, chunk_runs)
                budget -= size
        return inline

    async def _watch_precopy(self, migration: Migration) -> None:
        """Forget a migration whose destination fell silent during pre-copy, or whose
        pre-copy did not come to a switch-over in time."""
        while self.phase is Phase.PRECOPY and self.migration is migration:
            await asyncio.sleep(min(1.0, self.offer_timeout / 4, self.precopy_timeout / 4))
            if self.phase is not Phase.PRECOPY or self.migration is not migration:
                return
            if time.monotonic() - migration.offered_at > self.precopy_timeout:
                log.warning(
                    "the destination of migration %s made no progress to a switch-over in "
                    "%.0fs of pre-copy (--precopy-timeout); forgetting it (the VM keeps "
                    "running here)",
                    fingerprint(migration.id),
                    self.precopy_timeout,
                )
                self._to(Phase.IDLE)
                return
            if time.monotonic() - migration.conn.last_work <= self.offer_timeout:
                continue  # pings do not count as work
            if self.phase is Phase.PRECOPY and self.migration is migration:
                log.warning(
                    "the destination of migration %s said nothing for %.0fs in pre-copy; "
                    "forgetting it (the VM keeps running here)",
                    fingerprint(migration.id),
                    self.offer_timeout,
                )
                self._to(Phase.IDLE)

    def _adopt(self, conn: Connection, call: tuple[int, bytes] | None, *phases: Phase) -> Migration:
        """A call (kind, body) that names the switched-over migration and proves the
        migration key (None: already checked): its connection owns it from now on (a
        destination that reconnected). Anything else is refused."""
        migration = self.migration
        if self.phase not in phases or migration is None:
            raise ProtocolError(ErrorCode.NO_MIGRATION, TAKEN_BACK)
        if call is not None:
            check_call(migration.key, call[0], migration.id, migration.seen, call[1])
        migration.conn = conn
        migration.destination_lost = False
        migration.cancel_rescue()
        return migration

    def _expect(self, conn: Connection) -> Migration:
        """A pre-copy call: only from the destination that offered."""
        migration = self.migration
        if self.phase is not Phase.PRECOPY or migration is None or conn is not migration.conn:
            raise ProtocolError(ErrorCode.REFUSED, f"not possible while {self.phase.value}")
        return migration

    async def _rescue(self, migration: Migration, after: float) -> None:
        """Before the hand-over, a destination that never comes back: resume here."""
        await asyncio.sleep(after)
        if self.phase is Phase.SUSPENDED and self.migration is migration:
            migration.rescue = None
            with contextlib.suppress(ProtocolError):  # logged; the VM stays paused here
                await self._resume_here("the hand-over did not happen: no write is lost")

    async def take_back(self) -> str:
        """The operator's call: resume the VM here while its destination is away. Says
        what that costs; refused while the destination is connected."""
        if self.phase not in (Phase.SUSPENDED, Phase.HANDED_OVER):
            return f"nothing to take back: the migration is {self.phase.value}"
        if not self.destination_lost:
            return "the destination is connected: it runs or loads the VM; not taking it back"
        lost = (
            "writes the destination took since the hand-over are lost"
            if self.phase is Phase.HANDED_OVER
            else "the hand-over did not happen: no write is lost"
        )
        try:
            await self._resume_here(lost)
        except ProtocolError as e:
            return e.message
        return f"took the VM back: {lost}"

    async def _resume_here(self, cost: str) -> None:
        back = self.phase
        self._to(Phase.RESCUING)  # a destination coming back now is refused
        if self.migration is not None:
            self.migration.cancel_rescue()
        log.error("resuming the VM here from its paused state: %s", cost)
        try:
            await self.vm.run(self.vm.resume_here)
        except Exception as e:
            log.error("could not resume the VM here: %s", e)
            self._to(back)
            raise ProtocolError(ErrorCode.REFUSED, f"could not resume the VM: {e}") from None
        self._to(Phase.IDLE)


def _in(phases: tuple[Phase, ...], kind: MsgType, handler: Handler) -> dict[Any, Handler]:
    return {(phase, kind): handler for phase in phases}


_AWAY = (Phase.SUSPENDED, Phase.HANDED_OVER)  # switched over: the VM does not run here

# (phase, call) -> its handler: every call the source answers, and when.
HANDLERS: dict[tuple[Phase, int], Handler] = {
    (Phase.IDLE, MsgType.MIGRATE_OFFER): MigrationSource._offer,
    (Phase.PRECOPY, MsgType.DIRTY_LIST): MigrationSource._dirty_list,
    (Phase.PRECOPY, MsgType.MIGRATE_SUSPENDED): MigrationSource._switch_over_call,
    **_in(
        (Phase.SWITCHING, Phase.SUSPENDED), MsgType.MIGRATE_SUSPENDED, MigrationSource._answer_again
    ),  # fmt: skip
    **_in(_AWAY, MsgType.MIGRATE_RESUME, MigrationSource._destination_back),
    **_in(_AWAY, MsgType.MIGRATE_HANDOVER, MigrationSource._hand_over),
    (Phase.SUSPENDED, MsgType.MIGRATE_ABORT): MigrationSource._abort,
    (Phase.HANDED_OVER, MsgType.MIGRATE_ABORT): MigrationSource._abort_refused,
    (Phase.HANDED_OVER, MsgType.MIGRATE_CHALLENGE): MigrationSource._challenge,
    (Phase.HANDED_OVER, MsgType.MIGRATE_DONE): MigrationSource._done,
}
