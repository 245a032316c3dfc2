"""Live migration between peers: the source side, and the wire format of its answers.

The destination drives (see :meth:`drafter.peer.Peer`): it offers a migration, pulls
every chunk while the source VM keeps running, asks for the chunks dirtied since
(pre-copy rounds), then asks the source to switch over: BeforeSuspend, pause, save
state, flush memory, final dirty list. It resumes its VM at once and fetches what is
left on demand and in the background (post-copy), then says it is done and the
source stops. Until switch-over the source VM runs as if nothing happened; a
destination that leaves early costs nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import json
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drafter.device import Device, Priority
from drafter.snapshot import fsync_file
from drafter.transport.hashes import chunk_hash
from drafter.transport.protocol import (
    ErrorCode,
    MsgType,
    ProtocolError,
    is_chunk_lists,
    loads_json,
)

if TYPE_CHECKING:
    from drafter.metrics import Metrics

log = logging.getLogger(__name__)

TRACKED = ("memory", "disk")  # the resources a running VM changes
_SUSPENDED_HEAD = struct.Struct(">I")  # length of the JSON part; the state follows


class Phase(enum.Enum):
    IDLE = "idle"
    PRECOPY = "pre-copy"
    SWITCHING = "switching over"  # BeforeSuspend, pause, state: no other step meanwhile
    SUSPENDED = "suspended"
    RESCUING = "rescuing"  # resuming the VM here after the destination was lost
    DONE = "done"


def encode_suspended(dirty: dict[str, list[int]], state: bytes, paused_at: float) -> bytes:
    """The switch-over answer: final dirty lists, when the VM paused (wall clock), state."""
    head = json.dumps({"dirty": dirty, "paused_at": paused_at}).encode()
    return _SUSPENDED_HEAD.pack(len(head)) + head + state


def decode_suspended(body: bytes) -> tuple[dict[str, list[int]], float, bytes]:
    """The switch-over answer from a source; ProtocolError if it is malformed."""
    if len(body) < _SUSPENDED_HEAD.size:
        raise ProtocolError(ErrorCode.PROTOCOL, "malformed switch-over answer")
    (length,) = _SUSPENDED_HEAD.unpack_from(body)
    head = loads_json(
        body[4 : 4 + length],
        "switch-over answer",
        lambda v: (
            isinstance(v, dict)
            and is_chunk_lists(v.get("dirty"), TRACKED)
            and isinstance(v.get("paused_at", 0.0), (int, float))
        ),
    )
    return head["dirty"], float(head.get("paused_at", 0.0)), body[4 + length :]


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
        suspend: Callable[[], Awaitable[tuple[bytes, float]]],
        resume_here: Callable[[], Awaitable[None]],
        finished: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.suspend = suspend
        self.resume_here = resume_here
        self.finished = finished

    async def run(self, make: Callable[[], Awaitable[Any]]) -> Any:
        async def call() -> Any:
            return await make()

        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(call(), self.loop)
        return await asyncio.wrap_future(future)


class MigrationSource:
    """A ChunkProvider over a running peer's devices that one destination at a time
    can migrate the VM away from. Runs on the device loop."""

    def __init__(
        self,
        devices: dict[str, Device],
        config: bytes,
        memory_file: Path,
        vm: VMControl,
        grace: float = 30.0,
        offer_timeout: float = 30.0,
    ) -> None:
        self.devices = devices
        self._config = config
        self.memory_file = memory_file
        self.vm = vm
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
        self.hot_chunks: dict[str, list[int]] = {}  # what the VM touched after its resume
        self.paused_at: float | None = None
        self._grace_task: asyncio.Task[None] | None = None

    @property
    def phase(self) -> Phase:
        return self._phase

    @phase.setter
    def phase(self, new: Phase) -> None:
        old, self._phase = self._phase, new
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
        return dict(self.hot_chunks)

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
            self.phase = Phase.PRECOPY
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
            self._expect(conn, Phase.PRECOPY)
            self.phase = Phase.SWITCHING  # the offer watchdog and other offers keep off
            self._lost_while_switching = False
            try:
                state, paused_at = await self.vm.run(self.vm.suspend)
            except Exception as e:
                log.error("switch-over failed, the VM keeps running here: %s", e)
                self.phase = Phase.IDLE
                self.migrating = None
                raise ProtocolError(ErrorCode.REFUSED, f"switch-over failed: {e}") from None
            try:
                # The suspend synced memory after the pause (and QEMU flushes the disk
                # when it pauses): nothing more to push, no second sync in the downtime.
                dirty = await self._collect_dirty(sync=False)
            except Exception as e:
                log.error("switch-over failed after the pause (%s); resuming the VM here", e)
                try:
                    await self.vm.run(self.vm.resume_here)
                finally:
                    self.phase = Phase.IDLE
                    self.migrating = None
                raise ProtocolError(ErrorCode.REFUSED, f"switch-over failed: {e}") from None
            self.phase = Phase.SUSPENDED
            self.paused_at = time.monotonic()
            log.info("switched over: the VM is paused here, the destination resumes it")
            if self._lost_while_switching:  # the answer will not arrive: as if lost now
                self.connection_closed(conn)
            return encode_suspended(dirty, state, paused_at)
        if kind == MsgType.MIGRATE_RESUME:
            # The destination came back after a lost connection: it owns the migration
            # again, and the source must not resume the VM itself.
            self._adopt(conn, body)
            log.info("the destination of migration %s is back", self.migration_id)
            return b""
        if kind == MsgType.MIGRATE_DONE:
            self._adopt(conn, body)
            self.phase = Phase.DONE
            if self._grace_task is not None:
                self._grace_task.cancel()
            log.info("the destination holds everything and runs the VM")
            self.vm.loop.call_soon_threadsafe(self.vm.finished)
            return b""
        raise ProtocolError(ErrorCode.REFUSED, f"unknown control call {kind}")

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
                self.phase = Phase.IDLE
                self.migrating = None

    def _adopt(self, conn: object, body: bytes) -> None:
        """The connection that names the switched-over migration owns it from now on."""
        if self.phase is not Phase.SUSPENDED or decode_id(body) != self.migration_id:
            raise ProtocolError(ErrorCode.REFUSED, "no such switched-over migration")
        self.migrating = conn
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
            self.phase = Phase.IDLE
            self.migrating = None
        elif self.phase is Phase.SUSPENDED and self._grace_task is None:
            log.warning(
                "lost the destination after switch-over; waiting %.0fs for it to come back",
                self.grace,
            )
            self._grace_task = asyncio.ensure_future(self._rescue())

    async def _rescue(self) -> None:
        """After switch-over, a destination that never comes back: resume here."""
        await asyncio.sleep(self.grace)
        if self.phase is not Phase.SUSPENDED:
            return
        self.phase = Phase.RESCUING  # a destination coming back now is refused
        log.error(
            "the destination did not finish the migration: resuming the VM here from its "
            "paused state; writes the destination took after switch-over are lost"
        )
        try:
            await self.vm.run(self.vm.resume_here)
        except Exception as e:
            log.error("could not resume the VM here either: %s", e)
            self.phase = Phase.SUSPENDED
            return
        self.phase = Phase.IDLE
        self.migrating = None
        self._grace_task = None
