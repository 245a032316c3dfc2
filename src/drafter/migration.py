"""Live migration between peers: both halves of the protocol, and its wire formats.

The destination (:class:`MigrationDestination`, driven by :class:`drafter.peer.Peer`)
offers a migration, pulls every chunk while the source VM keeps running, asks for the
chunks dirtied since (pre-copy rounds), then asks the source (:class:`MigrationSource`)
to switch over: BeforeSuspend, pause, save state, sync memory, final dirty list. It
loads the state and asks for the **hand-over**, the right to run the VM: from the
grant on, the VM is the destination's and the source never resumes it by itself. The
destination resumes its VM, fetches what is left on demand and in the background
(post-copy), then says it is done and the source stops.

Until the grant the source can always take the VM back (the destination never ran
it); after it, a lost link is recovered (the destination reconnects and names the
migration), never forked. Every phase and transition is in the two tables below;
docs/migration.md draws them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from drafter import loops
from drafter.device import Device, Priority
from drafter.errors import DrafterError
from drafter.snapshot import failpoint, failpoint_delay, fsync_file
from drafter.transport.hashes import chunk_hash
from drafter.transport.protocol import (
    MAX_ANSWER,
    MAX_BODY,
    ErrorCode,
    MsgType,
    ProtocolError,
    is_chunk_lists,
    loads_json,
)

if TYPE_CHECKING:
    from drafter.metrics import Metrics
    from drafter.transport.client import RemoteSource

log = logging.getLogger(__name__)

TRACKED = ("memory", "disk")  # the resources a running VM changes
_SUSPENDED_HEAD = struct.Struct(">I")  # length of the JSON part; the state follows


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
    # DONE; or ABORT (the destination never ran it), operator
    Phase.HANDED_OVER: frozenset({Phase.DONE, Phase.RESCUING}),
    # resumed here; or the resume failed and it stays where it was
    Phase.RESCUING: frozenset({Phase.IDLE, Phase.SUSPENDED, Phase.HANDED_OVER}),
    Phase.DONE: frozenset(),
}


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

TAKEN_BACK = "no such switched-over migration"  # the refusal a taken-back destination gets
MAX_PHASES = 16  # timed steps a switch-over answer may name
INLINE_MARGIN = 64 << 10  # room left in the switch-over answer for its head
# The most a switch-over answer carries with the state (the dirty pages; the rest is
# fetched after the resume): a few seconds at tens of Mbit/s, in the downtime.
INLINE_LIMIT = 16 << 20
MAX_HEAD = 4 << 20  # a switch-over answer's JSON head (dirty lists, runs)
MAX_RUNS = 1 << 16  # inline runs in one switch-over answer


@dataclass
class SwitchOver:
    """The source's answer to a switch-over: the chunks dirtied since the last round,
    when the VM paused (wall clock), the milliseconds each step took there, the state,
    and the bytes of some of the dirty chunks (``inline``: resource -> index -> bytes),
    so that the destination need not ask for them once its VM runs."""

    dirty: dict[str, list[int]]
    paused_at: float
    phases: dict[str, float]
    state: bytes
    inline: dict[str, dict[int, list[tuple[int, bytes]]]] = field(default_factory=dict)


def encode_suspended(answer: SwitchOver) -> bytes:
    """The switch-over answer on the wire: u32 length, JSON head, the state, then the
    inline chunks' bytes in the order the head lists them."""
    head = json.dumps(
        {
            "dirty": answer.dirty,
            "paused_at": answer.paused_at,
            "phases": answer.phases,
            "state_size": len(answer.state),
            "inline": {
                name: [
                    [index, offset, len(data)]
                    for index, runs in chunks.items()
                    for offset, data in runs
                ]
                for name, chunks in answer.inline.items()
            },  # fmt: skip
        }
    ).encode()
    runs = [data for chunks in answer.inline.values() for r in chunks.values() for _, data in r]
    return b"".join([_SUSPENDED_HEAD.pack(len(head)), head, answer.state, *runs])


def _is_phases(value: object) -> bool:
    return (
        isinstance(value, dict)
        and len(value) <= MAX_PHASES
        and all(
            isinstance(k, str)
            and len(k) <= 32
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and 0 <= v < 1e7
            for k, v in value.items()
        )
    )


def _is_runs(value: object) -> bool:
    """``{"memory": [[index, offset, length], ...], ...}``: the inline runs' shape, at
    most MAX_RUNS of them."""
    if not isinstance(value, dict) or not all(isinstance(v, list) for v in value.values()):
        return False
    if sum(len(v) for v in value.values()) > MAX_RUNS:
        return False
    return all(
        k in TRACKED
        and isinstance(v, list)
        and all(
            isinstance(r, list)
            and len(r) == 3
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 40 for i in r)
            for r in v
        )
        for k, v in value.items()
    )


def decode_suspended(body: bytes, sizes: dict[str, tuple[int, int]] | None = None) -> SwitchOver:
    """The switch-over answer from a source; ProtocolError if it is malformed.
    ``sizes`` (resource -> (size, chunk size)) says how long each inline chunk is."""
    if len(body) < _SUSPENDED_HEAD.size:
        raise ProtocolError(ErrorCode.PROTOCOL, "malformed switch-over answer")
    (length,) = _SUSPENDED_HEAD.unpack_from(body)
    if length > MAX_HEAD:
        raise ProtocolError(ErrorCode.PROTOCOL, "a switch-over answer's head beyond 4 MiB")
    end = 4 + length
    head = loads_json(
        body[4:end],
        "switch-over answer",
        lambda v: (
            isinstance(v, dict)
            and is_chunk_lists(v.get("dirty"), TRACKED)
            and isinstance(v.get("paused_at", 0.0), (int, float))
            and _is_phases(v.get("phases", {}))
            and _is_runs(v.get("inline", {}))
            and isinstance(v.get("state_size", len(body) - end), int)
            and 0 <= v.get("state_size", len(body) - end) <= len(body) - end
        ),
    )
    phases = {k: float(v) for k, v in head.get("phases", {}).items()}
    state_end = end + head.get("state_size", len(body) - end)
    inline: dict[str, dict[int, list[tuple[int, bytes]]]] = {}
    at = state_end
    for name, runs in head.get("inline", {}).items():
        size, chunk_size = (sizes or {}).get(name, (0, 1))
        dirty = set(head["dirty"].get(name, []))
        chunks: dict[int, list[tuple[int, bytes]]] = {}
        inline[name] = chunks
        last = (-1, 0)  # (index, end) of the run before: runs come in order, apart
        for index, offset, length in runs:
            if index not in dirty:
                raise ProtocolError(ErrorCode.PROTOCOL, "inline bytes of a chunk not dirty")
            if (index, offset) < last:
                raise ProtocolError(ErrorCode.PROTOCOL, "inline runs out of order")
            run_end = offset + length
            if length <= 0 or run_end > min(chunk_size, size - index * chunk_size):
                raise ProtocolError(ErrorCode.PROTOCOL, f"inline run {name} {index} is cut")
            if at + length > len(body):
                raise ProtocolError(ErrorCode.PROTOCOL, f"inline run {name} {index} is cut")
            chunks.setdefault(index, []).append((offset, body[at : at + length]))
            at += length
            last = (index, run_end)
    if at != len(body):
        raise ProtocolError(ErrorCode.PROTOCOL, "bytes after the switch-over answer's chunks")
    state = body[end:state_end]
    return SwitchOver(head["dirty"], float(head.get("paused_at", 0.0)), phases, state, inline)


def decode_offer(body: bytes) -> tuple[str, dict[str, list[int]]]:
    """The answer to an offer: the migration's id and what changed since hashing."""
    value = loads_json(
        body,
        "offer answer",
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("migration"), str)
            and 0 < len(v["migration"]) <= 64
            and is_chunk_lists(v.get("dirty"), TRACKED)
        ),
    )
    return value["migration"], value["dirty"]


def encode_id(migration: str) -> bytes:
    """The body of the calls that name a migration (DONE, RESUME)."""
    return json.dumps({"migration": migration}).encode()


def decode_id(body: bytes) -> str | None:
    """The migration a call names, or None if the body does not name one."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict) and isinstance(value.get("migration"), str):
        return str(value["migration"])
    return None


def decode_dirty(body: bytes) -> dict[str, list[int]]:
    """A dirty-list answer from a source; ProtocolError if it is malformed."""
    value: dict[str, list[int]] = loads_json(
        body, "dirty list", lambda v: is_chunk_lists(v, TRACKED)
    )
    return value


class VMControl:
    """What the source needs from the VM, as coroutines on the VM's own event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        suspend: Callable[[], Awaitable[tuple[bytes, float, dict[str, float]]]],
        resume_here: Callable[[], Awaitable[None]],
        finished: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.suspend = suspend
        self.resume_here = resume_here
        self.finished = finished

    async def run(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """Run one of the VM's steps on its loop, from the device loop."""

        async def call() -> Any:
            return await make()

        return await loops.run_on(self.loop, call())


class MigrationSource:
    """A ChunkProvider over a running peer's devices that one destination at a time
    can migrate the VM away from. Runs on the device loop."""

    def __init__(
        self,
        devices: dict[str, Device],
        config: bytes,
        memory_file: Path,
        vm: VMControl,
        grace: float | None = 30.0,
        offer_timeout: float = 30.0,
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
        self._watch_task: asyncio.Task[None] | None = None
        self._lost_while_switching = False
        self.chunk_size = next(iter(devices.values())).chunk_size
        self.metrics: Metrics | None = None  # drafter.metrics: times phases, counts outcomes
        self._phase = Phase.IDLE
        self.migrating: object | None = None  # the destination's connection
        self.migration_id = ""  # names the migration in every call after the offer
        # What the VM touched after its resume: fixed, or asked for at each connection.
        self.hot_chunks: dict[str, list[int]] | Callable[[], dict[str, list[int]]] = {}
        self.paused_at: float | None = None
        self._grace_task: asyncio.Task[None] | None = None
        self._destination_lost = False  # after switch-over: its connection is gone
        self._answer: asyncio.Future[bytes] | None = None  # the switch-over's, once asked

    @property
    def phase(self) -> Phase:
        return self._phase

    def _to(self, new: Phase) -> None:
        """The one place the phase changes; only along SOURCE_TRANSITIONS."""
        old = self._phase
        if new not in SOURCE_TRANSITIONS[old]:
            raise AssertionError(f"migration source: {old.value} -> {new.value}")
        self._phase = new
        log.debug("migration source: %s -> %s", old.value, new.value)
        if new in (Phase.IDLE, Phase.DONE):
            self.migrating = None
        if new not in (Phase.SWITCHING, Phase.SUSPENDED):
            self._answer = None  # the switch-over answer is kept only while it may be lost
        if self.metrics is not None:
            self.metrics.source_phase(old, new)

    # -- ChunkProvider -------------------------------------------------------------

    def manifest(self) -> dict[str, int]:
        # No "state": it only exists at switch-over. That tells clients "a peer".
        return {name: d.size for name, d in self.devices.items()}

    def config(self) -> bytes:
        return self._config

    async def read_chunk(self, resource: str, index: int) -> tuple[bytes, bytes | None]:
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

    # -- control calls ---------------------------------------------------------------

    async def _collect_dirty(self, sync: bool = True) -> dict[str, list[int]]:
        """The chunks written since the last collection; ``sync`` first pushes the pages
        the running guest dirtied in QEMU's mapping down to the devices."""
        if sync:
            await asyncio.to_thread(fsync_file, self.memory_file)
        return {name: sorted(self.devices[name].take_dirty()) for name in TRACKED}

    async def control(self, conn: object, kind: int, body: bytes) -> bytes:
        if kind == MsgType.MIGRATE_OFFER:
            if self.phase is not Phase.IDLE:
                raise ProtocolError(ErrorCode.BUSY, f"a migration is already {self.phase.value}")
            self._to(Phase.PRECOPY)
            self.migrating = conn
            self.migration_id = secrets.token_hex(16)
            # What changed since it was last collected, the destination's hashes of it
            # included: it must not trust those. From now on, dirty means "since the offer".
            dirty = await self._collect_dirty()
            log.info(
                "migration %s offered: pre-copy starts; the VM keeps running", self.migration_id
            )
            self._watch_task = asyncio.ensure_future(self._watch_precopy(conn))
            return json.dumps({"migration": self.migration_id, "dirty": dirty}).encode()
        if kind == MsgType.DIRTY_LIST:
            self._expect(conn, Phase.PRECOPY)
            return json.dumps(await self._collect_dirty()).encode()
        if kind == MsgType.MIGRATE_SUSPENDED:
            answer = self._answer
            if answer is not None and self.phase in (Phase.SWITCHING, Phase.SUSPENDED):
                # Asked again, naming the migration: the destination lost the answer on
                # a cut. The same answer again, once the switch-over has it.
                if decode_id(body) != self.migration_id:
                    raise ProtocolError(ErrorCode.REFUSED, TAKEN_BACK)
                encoded = await asyncio.shield(answer)
                self._adopt(conn, body, Phase.SUSPENDED)
                log.info("the destination of migration %s asked again", self.migration_id)
                return encoded
            self._expect(conn, Phase.PRECOPY)
            answer = self._answer = asyncio.get_running_loop().create_future()
            try:
                encoded = encode_suspended(await self._switch_over(conn))
            except Exception as e:
                answer.set_exception(e)
                answer.exception()  # retrieved: whoever asked again gets it too
                raise
            except BaseException:
                answer.cancel()
                raise
            answer.set_result(encoded)
            return encoded
        if kind == MsgType.MIGRATE_RESUME:
            # The destination came back after a lost connection: it owns the migration
            # again, and the source must not resume the VM itself.
            self._adopt(conn, body, Phase.SUSPENDED, Phase.HANDED_OVER)
            log.info("the destination of migration %s is back", self.migration_id)
            return b""
        if kind == MsgType.MIGRATE_HANDOVER:
            # The destination has the state and asks for the right to run the VM. Asked
            # again (its answer was lost), the grant is given again.
            self._adopt(conn, body, Phase.SUSPENDED, Phase.HANDED_OVER)
            if self.phase is Phase.SUSPENDED:
                self._to(Phase.HANDED_OVER)
                log.info("handed the VM over: it runs at the destination from now on")
            failpoint("after-handover")
            return b""
        if kind == MsgType.MIGRATE_ABORT:
            # The destination gives up before it ran the VM: it runs here again.
            self._adopt(conn, body, Phase.SUSPENDED, Phase.HANDED_OVER)
            log.warning("the destination gave the migration up before running the VM")
            await self._resume_here("the destination did not run it; no write is lost")
            return b""
        if kind == MsgType.MIGRATE_DONE:
            self._adopt(conn, body, Phase.HANDED_OVER)
            self._to(Phase.DONE)
            log.info("the destination holds everything and runs the VM")
            self.vm.loop.call_soon_threadsafe(self.vm.finished)
            return b""
        raise ProtocolError(ErrorCode.REFUSED, f"unknown control call {kind}")

    async def _switch_over(self, conn: object) -> SwitchOver:
        self._to(Phase.SWITCHING)  # the offer watchdog and other offers keep off
        self._lost_while_switching = False
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
            limit = min(INLINE_LIMIT, getattr(conn, "answer_limit", MAX_BODY))
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
        self.paused_at = time.monotonic()
        log.info("switched over: the VM is paused here, the destination loads it")
        if self._lost_while_switching:  # the answer will not arrive: as if lost now
            self.connection_closed(conn)
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

    async def _watch_precopy(self, conn: object) -> None:
        """Forget a migration whose destination fell silent during pre-copy."""
        while self.phase is Phase.PRECOPY and self.migrating is conn:
            await asyncio.sleep(min(1.0, self.offer_timeout / 4))
            last = getattr(conn, "last_work", None)  # pings do not count
            if last is None or time.monotonic() - last <= self.offer_timeout:
                continue
            if self.phase is Phase.PRECOPY and self.migrating is conn:
                log.warning(
                    "the destination of migration %s said nothing for %.0fs in pre-copy; "
                    "forgetting it (the VM keeps running here)",
                    self.migration_id,
                    self.offer_timeout,
                )
                self._to(Phase.IDLE)

    def _adopt(self, conn: object, body: bytes, *phases: Phase) -> None:
        """A call that names the switched-over migration: its connection owns it from
        now on (a destination that reconnected). Anything else is refused."""
        if self.phase not in phases or decode_id(body) != self.migration_id:
            raise ProtocolError(ErrorCode.REFUSED, TAKEN_BACK)
        self.migrating = conn
        self._destination_lost = False
        if self._grace_task is not None:
            self._grace_task.cancel()
            self._grace_task = None

    def _expect(self, conn: object, phase: Phase) -> None:
        if self.phase is not phase or conn is not self.migrating:
            raise ProtocolError(ErrorCode.REFUSED, f"not possible while {self.phase.value}")

    def connection_closed(self, conn: object) -> None:
        if conn is not self.migrating:
            return
        if self.phase is Phase.SWITCHING:
            self._lost_while_switching = True
            return
        if self.phase is Phase.PRECOPY:
            log.warning("the destination left before switch-over; the VM keeps running here")
            self._to(Phase.IDLE)
            return
        if self.phase not in (Phase.SUSPENDED, Phase.HANDED_OVER):
            return
        self._destination_lost = True
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
        elif self._grace_task is None:
            log.warning(
                "lost the destination before the hand-over; waiting %.0fs for it to come back",
                self.grace,
            )
            self._grace_task = asyncio.ensure_future(self._rescue(self.grace))

    async def _rescue(self, after: float) -> None:
        """Before the hand-over, a destination that never comes back: resume here."""
        await asyncio.sleep(after)
        if self.phase is Phase.SUSPENDED:
            self._grace_task = None
            with contextlib.suppress(ProtocolError):  # logged; the VM stays paused here
                await self._resume_here("the hand-over did not happen: no write is lost")

    async def take_back(self) -> str:
        """The operator's call: resume the VM here while its destination is away. Says
        what that costs; refused while the destination is connected."""
        if self.phase not in (Phase.SUSPENDED, Phase.HANDED_OVER):
            return f"nothing to take back: the migration is {self.phase.value}"
        if not self._destination_lost:
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
        if self._grace_task is not None:
            self._grace_task.cancel()
            self._grace_task = None
        log.error("resuming the VM here from its paused state: %s", cost)
        try:
            await self.vm.run(self.vm.resume_here)
        except Exception as e:
            log.error("could not resume the VM here: %s", e)
            self._to(back)
            raise ProtocolError(ErrorCode.REFUSED, f"could not resume the VM: {e}") from None
        self._to(Phase.IDLE)


class PageCache(Protocol):
    """The kernel's page cache of the device files the VMM maps (a
    :class:`drafter.devicefs.DeviceHost`)."""

    async def drop_cache(self, names: list[str]) -> None: ...

    async def store_cache(self, device: Device, indices: list[int]) -> int: ...

    async def store_cache_runs(
        self, device: Device, runs: dict[int, list[tuple[int, bytes]]]
    ) -> None: ...


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
        self.tracked = [devices[name] for name in TRACKED]
        self.pull_missing = pull_missing
        self.cache = cache
        # Chunks in the page cache, per device, in the order they were stored: the hot
        # set, then the final dirty chunks (the next host's hot set starts with them).
        self.cached: dict[str, dict[int, None]] = {d.name: {} for d in self.tracked}
        # Cached chunks the source changed since they were stored: to store again.
        self._stale: dict[str, set[int]] = {d.name: set() for d in self.tracked}
        self.rounds = rounds
        self.precopy_bytes = precopy_bytes
        self.retry_timeout = retry_timeout
        # How long the grant may take (through reconnects) before the destination gives
        # the migration up and the source resumes the VM.
        self.handover_timeout = handover_timeout
        self.migration_id = ""
        self.rounds_done = 0
        self.phases: dict[str, float] = {}  # step -> milliseconds, both sides
        self.told_to_run = False  # set by the caller right before the VM runs here
        self.on_taken_back: Callable[[], None] | None = None
        self._phase = DestinationPhase.CONNECTED
        self._calls: set[asyncio.Task[Any]] = set()

    @property
    def phase(self) -> DestinationPhase:
        return self._phase

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

    async def precopy(self) -> None:
        """Offer the migration, then pull and re-pull what the running VM dirtied."""
        try:
            body = await self.remote.call(MsgType.MIGRATE_OFFER)
            self.migration_id, changed = decode_offer(body)
            self._to(DestinationPhase.PRECOPY)
            self._invalidate(changed)  # changed at the source since it hashed them for us
            for _ in range(max(0, self.rounds)):  # 0 rounds: pure post-copy
                await self.pull_missing()
                if self.rounds_done == 0:
                    await self._warm()
                else:
                    await self._store_stale()
                dirty = decode_dirty(await self.remote.call(MsgType.DIRTY_LIST))
                self.rounds_done += 1
                dirty_bytes = self._invalidate(dirty)
                log.debug("pre-copy round %d: %d KiB dirtied", self.rounds_done, dirty_bytes >> 10)
                if dirty_bytes <= self.precopy_bytes:
                    break
            if self.rounds > 0:
                await self.pull_missing()
                await self._store_stale()
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
        # that paused resumes at once (it never handed the VM over).
        deadline = time.monotonic() + self.retry_timeout
        while True:
            try:
                body = await self.remote.call(
                    MsgType.MIGRATE_SUSPENDED,
                    encode_id(self.migration_id),
                    timeout=120,
                    max_answer=MAX_ANSWER,
                )
                break
            except DrafterError as e:
                # Lost on a cut, not refused: ask again once reconnected, naming the
                # migration; the source answers the same again.
                if self.remote.failed or time.monotonic() >= deadline:
                    raise
                log.warning("lost the switch-over answer (%s); asking again", e)
                await asyncio.sleep(0.05)
        answer = decode_suspended(body, sizes)
        self.remote.on_reconnect = self._reconnected
        took = (time.monotonic() - asked) * 1000
        self.phases.update(answer.phases)
        self.phases["transfer"] = max(0.0, took - sum(answer.phases.values()))
        patched = self._apply(answer)
        stored = time.monotonic()
        await self._refresh(answer, patched)
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
        while True:
            try:
                await self.remote.call(
                    MsgType.MIGRATE_HANDOVER,
                    encode_id(self.migration_id),
                    timeout=max(0.1, deadline - time.monotonic()),
                )
            except DrafterError as e:
                if TAKEN_BACK in str(e) or self._phase is DestinationPhase.TAKEN_BACK:
                    self._taken_back()
                    raise DrafterError("the source took the VM back; it runs there") from None
                if self.remote.failed or time.monotonic() >= deadline:
                    raise DrafterError(f"the source did not hand the VM over: {e}") from None
                log.debug("asking for the hand-over: %s; again", e)
                await asyncio.sleep(0.05)
                continue
            if self._phase is DestinationPhase.LOADING:  # not taken back meanwhile
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
        self._to(DestinationPhase.FAILED)
        deadline = time.monotonic() + self.retry_timeout
        while True:
            try:
                await self.remote.call(MsgType.MIGRATE_ABORT, encode_id(self.migration_id))
                log.warning("gave the migration up: the VM runs at the source again")
                return
            except DrafterError as e:
                if TAKEN_BACK in str(e):
                    return  # the source took it back already
                if self.remote.failed or time.monotonic() >= deadline:
                    log.error(
                        "could not tell the source to take the VM back (%s): it stays "
                        "paused there until the source's rescue timeout or its operator",
                        e,
                    )
                    return
                await asyncio.sleep(0.2)

    async def finish(self) -> bool:
        """Every chunk is here: tell the source, through reconnects for
        ``retry_timeout`` seconds (it stops once told); whether it was told."""
        await asyncio.sleep(failpoint_delay("before-done"))
        deadline = time.monotonic() + self.retry_timeout
        while True:
            try:
                await self.remote.call(MsgType.MIGRATE_DONE, encode_id(self.migration_id))
                break
            except DrafterError as e:
                if TAKEN_BACK in str(e):
                    self._taken_back()
                    return False
                if self.remote.failed or time.monotonic() > deadline:
                    log.warning("could not tell the source the migration is done: %s", e)
                    return False
                log.debug("telling the source the migration is done: %s; again", e)
                await asyncio.sleep(0.2)
        self._to(DestinationPhase.DONE)
        return True

    def _reconnected(self) -> None:
        """After a lost connection past switch-over: tell the source we are back, so it
        keeps the migration ours instead of resuming the VM itself."""
        if self._phase not in (DestinationPhase.LOADING, DestinationPhase.RUNNING):
            return

        async def resume() -> None:
            try:
                await self.remote.call(MsgType.MIGRATE_RESUME, encode_id(self.migration_id))
            except DrafterError as e:
                if TAKEN_BACK not in str(e):
                    log.warning("could not tell the source we are back: %s", e)
                elif self._phase in (DestinationPhase.LOADING, DestinationPhase.RUNNING):
                    self._taken_back()

        task = asyncio.ensure_future(resume())
        self._calls.add(task)  # referenced until it is done
        task.add_done_callback(self._calls.discard)

    async def _warm(self) -> None:
        """After the first pull of pre-copy, the VM still running at the source: put the
        chunks it touches first (the source's hot set) into the page cache here, so
        that once it runs here it finds them without a FUSE read each. The cache is
        emptied first: QEMU is up, and nothing it may have read stays. From here on,
        every pull is followed by :meth:`_store_stale`."""
        start = time.monotonic()
        await self.cache.drop_cache(list(TRACKED))
        stored = 0
        try:
            for device in self.tracked:
                hot = [i for i in self.remote.hot.get(device.name, []) if device.local[i]]
                self.cached[device.name] = dict.fromkeys(hot)
                self._stale[device.name] = set()
                stored += await self.cache.store_cache(device, hot)
        except DrafterError as e:
            await self._drop_all(e)
        log.debug(
            "page cache: %d hot chunk(s) stored in %.0f ms",
            stored,
            (time.monotonic() - start) * 1000,
        )

    async def _store_stale(self) -> None:
        """Store again the cached chunks that were pulled again since they changed."""
        try:
            for device in self.tracked:
                stale = self._stale[device.name]
                here = sorted(i for i in stale if device.local[i])
                await self.cache.store_cache(device, here)
                stale.difference_update(here)
        except DrafterError as e:
            await self._drop_all(e)

    async def _drop_all(self, error: DrafterError) -> None:
        """A store failed: the cache may hold stale pages. It goes whole; the VM reads
        through FUSE instead (slower, never stale)."""
        log.warning("%s; dropping the page cache instead", error)
        await self.cache.drop_cache(list(TRACKED))
        self.cached = {d.name: {} for d in self.tracked}
        self._stale = {d.name: set() for d in self.tracked}

    async def _refresh(self, answer: SwitchOver, patched: dict[str, set[int]]) -> None:
        """Switch-over, the VM runs nowhere: the page cache must hold nothing older than
        the devices. A cached chunk that took the last dirty pages gets those pages
        again; another dirty chunk that is here is stored whole. If a cached chunk is
        not here, the whole cache goes (FUSE cannot drop a part of it) and only the
        chunks that are here are stored."""
        stale = any(not d.local[i] for d in self.tracked for i in self._stale[d.name])
        if stale or not any(self.cached.values()):  # nothing warmed: drop what QEMU read
            await self.cache.drop_cache(list(TRACKED))
            self.cached = {d.name: {} for d in self.tracked}
        try:
            for device in self.tracked:
                cached = self.cached[device.name]
                inline = answer.inline.get(device.name, {})
                pages = {i: inline[i] for i in patched.get(device.name, set()) if i in cached}
                here = [
                    i
                    for i in answer.dirty.get(device.name, [])
                    if device.local[i] and i not in pages
                ]
                cached.update(dict.fromkeys(here))
                await self.cache.store_cache_runs(device, pages)
                await self.cache.store_cache(device, here)
                self._stale[device.name] = set()
        except DrafterError as e:
            await self._drop_all(e)

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
            cached = self.cached[device.name]
            self._stale[device.name].update(i for i in chunks if i in cached)
            total += len(chunks) * device.chunk_size
        return total
