"""Both halves of the migration protocol with a fake VM: fast checks of every phase.

A real :class:`ChunkServer` serves a :class:`MigrationSource` over small real devices;
a real :class:`RemoteSource` carries a :class:`MigrationDestination`'s calls, through
a proxy in the same event loop that can cut the link. Only the VM is fake: it records
whether it runs at the source. The end-to-end tests with QEMU guests are in
tests/vm/test_migration.py and tests/vm/test_wire_peers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import drafter.migration as migration
from drafter.device import Device, Priority
from drafter.errors import DrafterError
from drafter.migration import (
    DESTINATION_TRANSITIONS,
    SOURCE_TRANSITIONS,
    DestinationPhase,
    MigrationDestination,
    MigrationSource,
    Phase,
    SwitchOver,
    VMControl,
    decode_suspended,
    encode_id,
    encode_suspended,
    no_migration,
)
from drafter.transport.client import RemoteSource
from drafter.transport.protocol import MsgType, ProtocolError
from drafter.transport.server import ChunkServer

CHUNK = 64 * 1024
SIZE = 8 * CHUNK


class FakeVM:
    """Where the VM runs: ``running_here`` at the source; counts its steps."""

    def __init__(self, fail_suspend: bool = False) -> None:
        self.running_here = True
        self.suspends = 0
        self.resumes = 0
        self.finished = False
        self.fail_suspend = fail_suspend

    def control(self) -> VMControl:
        async def suspend() -> tuple[bytes, float, dict[str, float]]:
            self.suspends += 1
            if self.fail_suspend:
                raise DrafterError("failpoint after-pause")  # resumed here by the suspend
            self.running_here = False
            return b"STATE" * 100, time.time(), {"BeforeSuspend": 1.0, "pause": 0.5}

        async def resume_here() -> None:
            self.resumes += 1
            self.running_here = True

        def finished() -> None:
            self.finished = True

        return VMControl(asyncio.get_running_loop(), suspend, resume_here, finished)


class FakePageCache:
    """The kernel's page cache of the device files: the bytes stored per chunk."""

    def __init__(self) -> None:
        self.pages: dict[tuple[str, int], bytes] = {}
        self.drops = 0
        self.refusing = False  # stores fail (after storing the first chunk: a part)

    async def drop_cache(self, names: list[str]) -> None:
        self.drops += 1
        self.pages = {key: data for key, data in self.pages.items() if key[0] not in names}

    async def store_cache_runs(
        self, device: Device, runs: dict[int, list[tuple[int, bytes]]]
    ) -> None:
        for index, chunk_runs in runs.items():
            page = bytearray(self.pages[device.name, index])  # only into a cached chunk
            for offset, data in chunk_runs:
                page[offset : offset + len(data)] = data
            self.pages[device.name, index] = bytes(page)
            if self.refusing:
                raise DrafterError("the kernel refused a store")

    async def store_cache(self, device: Device, indices: list[int]) -> int:
        stored = [i for i in indices if device.local[i]]
        for index in stored:
            self.pages[device.name, index] = device.read_chunk(index)[0]
            if self.refusing:
                raise DrafterError("the kernel refused a store")
        return len(stored)


class Proxy:
    """A TCP proxy in this event loop; :meth:`cut` drops the open connections."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.refusing = False

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        writers, self.writers = self.writers, []
        for w in writers:
            w.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


class Pair:
    """A source serving a fake VM and a destination connected to it through a proxy."""

    def __init__(self, tmp: Path, vm: FakeVM, source: MigrationSource, proxy: Proxy) -> None:
        self.tmp = tmp
        self.vm = vm
        self.source = source
        self.proxy = proxy
        self.remotes: list[RemoteSource] = []

    async def destination(self, handover_timeout: float = 5.0) -> MigrationDestination:
        remote = await self.connect()
        devices = {}
        for name in ("memory", "disk"):
            device = Device(name, SIZE, None, self.tmp / f"dest-{name}", chunk_size=CHUNK,
                            source=remote)  # fmt: skip
            device.expect(remote.hashes[name], binding=False)
            devices[name] = device

        async def pull_missing() -> None:
            for device in devices.values():
                for index in device.missing():
                    await device.ensure_chunk(index, Priority.BACKGROUND)

        self.devices = devices
        self.cache = FakePageCache()
        return MigrationDestination(remote, devices, pull_missing, self.cache, rounds=2,
                                    retry_timeout=3, handover_timeout=handover_timeout)  # fmt: skip

    async def connect(self) -> RemoteSource:
        remote = RemoteSource(f"127.0.0.1:{self.proxy.target}", retry_timeout=3)
        remote.port = self.proxy_port
        remote.raddr = f"127.0.0.1:{self.proxy_port}"
        await remote.connect()
        self.remotes.append(remote)
        return remote

    proxy_port = 0


@contextlib.asynccontextmanager
async def pair(tmp: Path, grace: float | None = 30.0, offer_timeout: float = 30.0,
               vm: FakeVM | None = None,
               precopy_timeout: float | None = None) -> AsyncIterator[Pair]:  # fmt: skip
    vm = vm or FakeVM()
    devices = {name: Device(name, SIZE, None, tmp / f"src-{name}", chunk_size=CHUNK)
               for name in ("memory", "disk")}  # fmt: skip
    devices["memory"].write(0, b"hello" * 1000)
    source = MigrationSource(devices, b"{}", tmp / "memory-file", vm.control(), grace=grace,
                             offer_timeout=offer_timeout)  # fmt: skip
    source._collect_dirty = _no_sync(source)  # type: ignore[method-assign]
    if precopy_timeout is not None:
        source.precopy_timeout = precopy_timeout
    server = ChunkServer(source, control=source)
    await server.start("127.0.0.1", 0)
    proxy = Proxy(server.port)
    p = Pair(tmp, vm, source, proxy)
    p.proxy_port = await proxy.start()
    try:
        yield p
    finally:
        for remote in p.remotes:
            await remote.close()
        await proxy.close()
        await server.close()
        for device in devices.values():
            device.close()


def _no_sync(source: MigrationSource):  # type: ignore[no-untyped-def]
    """No memory file to sync here: the devices are written directly."""

    async def collect(sync: bool = True) -> dict[str, list[int]]:
        return {name: sorted(source.devices[name].take_dirty()) for name in ("memory", "disk")}

    return collect


async def wait_until(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def offer_body() -> bytes:
    """An offer with a fresh key share (a destination's half of the migration key)."""
    return migration.encode_offer_call(migration.KeyShare())


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, 60))


# -- the tables ------------------------------------------------------------------------


def test_every_phase_has_its_transitions_and_others_are_refused(tmp_path: Path) -> None:
    assert set(SOURCE_TRANSITIONS) == set(Phase)
    assert set(DESTINATION_TRANSITIONS) == set(DestinationPhase)

    async def main() -> None:
        async with pair(tmp_path) as p:
            with pytest.raises(AssertionError, match="idle -> handed over"):
                p.source._to(Phase.HANDED_OVER)
            assert p.source.phase is Phase.IDLE
            dest = await p.destination()
            with pytest.raises(AssertionError, match="connected -> running"):
                dest._to(DestinationPhase.RUNNING)

    run(main())


# -- the whole protocol ----------------------------------------------------------------


def test_a_migration_goes_through_every_phase_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path) as p:
            dest = await p.destination()
            await dest.precopy()
            assert (p.source.phase, dest.phase) == (Phase.PRECOPY, DestinationPhase.PRECOPY)
            assert p.devices["memory"].read(0, 5) == b"hello"
            p.source.devices["memory"].write(CHUNK, b"later")  # dirtied during pre-copy
            answer = await dest.switch_over()
            assert answer.state == b"STATE" * 100
            assert (p.source.phase, dest.phase) == (Phase.SUSPENDED, DestinationPhase.LOADING)
            assert not p.vm.running_here
            # The chunk dirtied last came with the state: local before the VM runs.
            assert answer.dirty["memory"] == [1] and list(answer.inline["memory"]) == [1]
            assert [(o, len(d)) for o, d in answer.inline["memory"][1]] == [(0, 4096)]  # a page
            assert p.devices["memory"].read(CHUNK, 5) == b"later"
            assert {"BeforeSuspend", "pause", "final dirty set", "transfer"} <= set(dest.phases)
            await dest.hand_over()
            assert (p.source.phase, dest.phase) == (Phase.HANDED_OVER, DestinationPhase.RUNNING)
            await dest.pull_missing()
            assert p.devices["memory"].read(CHUNK, 5) == b"later"
            assert await dest.finish()
            assert (p.source.phase, dest.phase) == (Phase.DONE, DestinationPhase.DONE)
            await wait_until(lambda: p.vm.finished)
            assert (p.vm.suspends, p.vm.resumes) == (1, 0)

    run(main())


def test_a_device_tracks_the_pages_written_in_each_dirty_chunk(tmp_path: Path) -> None:
    device = Device("memory", SIZE, None, tmp_path / "m", chunk_size=CHUNK)
    device.hashes = [b"h" * 32] * device.chunks  # as if every chunk's hash were known
    device.write(CHUNK + 4096, b"x" * 8192)  # pages 1 and 2 of chunk 1
    device.write(CHUNK + 5 * 4096 + 10, b"y")  # page 5
    device.write(CHUNK + 3 * 4096, b"z" * 4096)  # page 3: joins 1-2
    device.write(3 * CHUNK - 1, b"ab")  # the last byte of chunk 2, the first of chunk 3
    assert device.take_dirty_runs() == {
        1: [(4096, 3 * 4096), (5 * 4096, 4096)],
        2: [(CHUNK - 4096, 4096)],
        3: [(0, 4096)],
    }
    assert device.take_dirty_runs() == {}  # reset
    assert all(device.hashes[i] is None for i in (1, 2, 3))  # changed: hashed again
    odd = Device("disk", 300, None, tmp_path / "d", chunk_size=100)  # not whole pages
    odd.write(250, b"q")
    assert odd.take_dirty_runs() == {2: [(0, 100)]}
    odd.patch(2, [(10, b"PATCH")])
    assert odd.read(200, 20) == bytes(10) + b"PATCH" + bytes(5)
    with pytest.raises(DrafterError):
        odd.patch(2, [(98, b"xyz")])  # beyond the chunk


# -- the page cache ---------------------------------------------------------------------


def _cache_matches_source(p: Pair) -> None:
    """Every page the destination's page cache holds is the source's current bytes:
    the VM, once it runs there, reads nothing older."""
    for (name, index), data in p.cache.pages.items():
        assert data == p.source.devices[name].read_chunk(index)[0], (name, index)


def test_the_hot_set_is_cached_before_the_switch_over_and_refreshed_by_it(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with pair(tmp_path) as p:
            for index in range(4):
                p.source.devices["memory"].write(index * CHUNK, b"old %d" % index)
            p.source.hot_chunks = {"memory": [3, 0, 1], "disk": []}
            dest = await p.destination()
            await dest.precopy()
            # The VM still runs at the source; its hot chunks are in the cache here.
            assert sorted(p.cache.pages) == [("memory", 0), ("memory", 1), ("memory", 3)]
            drops = p.cache.drops
            p.source.devices["memory"].write(CHUNK, b"new 1")  # a cached chunk dirtied
            p.source.devices["memory"].write(2 * CHUNK, b"new 2")  # one not cached
            await dest.switch_over()
            assert p.cache.drops == drops  # both came with the state: stored again
            assert p.cache.pages["memory", 1].startswith(b"new 1")
            assert p.cache.pages["memory", 2].startswith(b"new 2")
            _cache_matches_source(p)
            # The next host's hot set begins with what was cached, in that order.
            assert list(dest.cached["memory"]) == [3, 0, 1, 2]

    run(main())


def after_first_pull(dest: MigrationDestination, then) -> list[int]:  # type: ignore[no-untyped-def]
    """Run ``then()`` right after the destination's first pull (before its hot set is
    cached); the list returned counts the pulls."""
    pulls = [0]
    pull = dest.pull_missing

    async def pull_then() -> None:
        await pull()
        pulls[0] += 1
        if pulls[0] == 1:
            then()

    dest.pull_missing = pull_then  # type: ignore[method-assign]
    return pulls


def test_a_cached_chunk_dirtied_during_pre_copy_is_stored_again_after_its_pull(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with pair(tmp_path) as p:
            p.source.devices["memory"].write(0, b"old")
            p.source.hot_chunks = {"memory": [0]}
            dest = await p.destination()
            # The hot set is cached next; then the VM writes to it.
            pulls = after_first_pull(dest, lambda: p.source.devices["memory"].write(0, b"new"))
            await dest.precopy()
            assert pulls == [2] and p.cache.pages["memory", 0].startswith(b"new")
            _cache_matches_source(p)

    run(main())


@pytest.mark.parametrize("when", ["pre-copy", "switch-over"])
def test_a_store_that_fails_empties_the_cache_and_the_migration_goes_on(
    tmp_path: Path, when: str
) -> None:
    async def main() -> None:
        async with pair(tmp_path) as p:
            for index in range(3):
                p.source.devices["memory"].write(index * CHUNK, b"old")
            p.source.hot_chunks = {"memory": [0, 1, 2]}
            dest = await p.destination()

            def write() -> None:
                p.source.devices["memory"].write(0, b"new")  # stored again next
                p.source.devices["memory"].write(CHUNK, b"new")
                p.cache.refusing = when == "pre-copy"

            after_first_pull(dest, write)
            await dest.precopy()
            p.source.devices["memory"].write(2 * CHUNK, b"new")
            p.cache.refusing = True
            await dest.switch_over()
            assert not p.cache.pages  # dropped whole, not left half stored
            assert not any(dest.cached.values())
            await dest.hand_over()
            await dest.pull_missing()
            for index in range(3):
                assert p.devices["memory"].read(index * CHUNK, 3) == b"new"

    run(main())


def test_a_cached_chunk_dirtied_but_not_sent_with_the_state_empties_the_cache(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with pair(tmp_path) as p:
            p.source.devices["memory"].write(0, b"old")
            p.source.hot_chunks = {"memory": [0]}
            p.source._inline = lambda dirty, budget: {}  # type: ignore[method-assign]
            dest = await p.destination()
            await dest.precopy()
            assert ("memory", 0) in p.cache.pages
            p.source.devices["memory"].write(0, b"new")
            await dest.switch_over()
            assert ("memory", 0) not in p.cache.pages  # read through FUSE: fetched anew
            _cache_matches_source(p)
            await dest.hand_over()
            await dest.pull_missing()
            assert p.devices["memory"].read(0, 3) == b"new"

    run(main())


# -- one authority ---------------------------------------------------------------------


def test_only_the_migration_s_owner_can_take_it_over_or_end_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path) as p:
            dest = await p.destination()
            await dest.precopy()
            await dest.switch_over()
            for kind in (MsgType.MIGRATE_HANDOVER, MsgType.MIGRATE_DONE, MsgType.MIGRATE_ABORT):
                for body in (b"", encode_id("not-the-migration"), b"\xff" * 40):
                    other = await p.connect()
                    with pytest.raises(DrafterError, match="no such switched-over migration") as e:
                        await other.call(kind, body)
                    assert no_migration(e.value)  # the wire code, not only the text
            # DONE before the hand-over is refused even with the right id.
            other = await p.connect()
            with pytest.raises(DrafterError, match="no such switched-over migration") as e:
                await other.call(MsgType.MIGRATE_DONE, encode_id(dest.migration_id))
            assert no_migration(e.value)
            assert p.source.phase is Phase.SUSPENDED and not p.vm.running_here
            await dest.hand_over()
            assert p.source.phase is Phase.HANDED_OVER

    run(main())


def test_a_third_party_that_knows_the_id_cannot_end_abort_or_take_the_migration(
    tmp_path: Path,
) -> None:
    """Issue 22, item 3: another connection (a token holder that learnt the id, from a
    log or the wire) names the migration: DONE would stop the source's VM, ABORT after
    the grant would resume it while the destination runs it, RESUME or HANDOVER would
    make its connection the destination's. Each is refused and changes nothing; so is a
    replay of a call the destination made, and a forged proof."""

    async def main() -> None:
        async with pair(tmp_path) as p:
            dest = await p.destination()
            await dest.precopy()
            await dest.switch_over()
            await dest.hand_over()
            mid = dest.migration_id
            attacker = await p.connect()
            forged = b'{"migration": "%s", "seq": 99, "proof": "%s"}' % (mid.encode(), b"0" * 32)
            for kind in (MsgType.MIGRATE_DONE, MsgType.MIGRATE_ABORT, MsgType.MIGRATE_RESUME,
                         MsgType.MIGRATE_HANDOVER):  # fmt: skip
                for body in (encode_id(mid), forged):
                    with pytest.raises(DrafterError) as e:
                        await attacker.call(kind, body)
                    assert no_migration(e.value), (kind, body, e.value)
            assert p.source.phase is Phase.HANDED_OVER and not p.vm.running_here
            assert not p.vm.finished and p.vm.resumes == 0
            # What the destination sent, seen on the wire and sent again: refused.
            seen = dest.signed(MsgType.MIGRATE_RESUME)
            await dest.remote.call(MsgType.MIGRATE_RESUME, seen)
            with pytest.raises(DrafterError) as e:
                await attacker.call(MsgType.MIGRATE_RESUME, seen)
            assert no_migration(e.value)
            assert p.source.migrating is not None and p.source.migrating.peer != ""
            # Its own connection still owns the migration: losing the attacker's does not
            # make the source think the destination is gone.
            await attacker.close()
            await asyncio.sleep(0.1)
            assert not p.source.destination_lost
            await dest.pull_missing()
            assert await dest.finish()
            assert p.source.phase is Phase.DONE and p.vm.resumes == 0

    run(main())


def test_the_migration_id_is_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 22, item 3: the id names the migration; the logs give a fingerprint."""

    async def main() -> None:
        async with pair(tmp_path) as p:
            dest = await p.destination()
            await dest.precopy()
            await dest.switch_over()
            p.proxy.cut()  # a reconnect: the "is back" and "asked again" lines
            await dest.hand_over()
            await dest.pull_missing()
            assert await dest.finish()
            return dest.migration_id

    caplog.set_level("DEBUG")
    mid = asyncio.run(asyncio.wait_for(main(), 60))
    offered = [r.getMessage() for r in caplog.records if "offered" in r.getMessage()]
    assert offered, "the offer is logged"
    for record in caplog.records:
        assert mid not in record.getMessage(), record.getMessage()


def test_a_second_offer_is_busy_and_pre_copy_calls_only_count_from_the_owner(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with pair(tmp_path) as p:
            dest = await p.destination()
            await dest.precopy()
            other = await p.connect()
            with pytest.raises(DrafterError, match="already pre-copy"):
                await other.call(MsgType.MIGRATE_OFFER)
            other = await p.connect()
            with pytest.raises(DrafterError, match="not possible while pre-copy"):
                await other.call(MsgType.MIGRATE_SUSPENDED)
            assert p.vm.running_here and p.source.phase is Phase.PRECOPY

    run(main())


def test_an_idle_offer_times_out_and_the_next_destination_migrates(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path, offer_timeout=0.3) as p:
            idle = await p.connect()
            await idle.call(MsgType.MIGRATE_OFFER, offer_body())
            await wait_until(lambda: p.source.phase is Phase.IDLE)
            dest = await p.destination()
            await dest.precopy()
            await dest.switch_over()
            await dest.hand_over()
            assert p.source.phase is Phase.HANDED_OVER

    run(main())


# -- what the destination must prove, and how long it may take ---------------------------


def _write_chunks(p: Pair, count: int = 6) -> None:
    for index in range(count):
        p.source.devices["memory"].write(index * CHUNK, b"chunk %d " % index * 100)
        p.source.devices["disk"].write(index * CHUNK + 7, b"disk %d" % index)


def test_a_destination_that_never_pulled_cannot_make_the_source_stop(tmp_path: Path) -> None:
    """Issue 22, item 4: OFFER, SUSPENDED, HANDOVER, DONE without pulling a chunk: the
    source must not stop its VM (it would be lost). Answers made up, or chunks fetched
    once challenged, do not pass either; the VM stays paused (handed over)."""

    async def main() -> None:
        async with pair(tmp_path) as p:
            _write_chunks(p)
            dest = await p.destination()
            dest.rounds = 0  # pure post-copy, and then no pull at all
            await dest.precopy()
            await dest.switch_over()
            await dest.hand_over()
            assert not await dest.finish()
            assert p.source.phase is Phase.HANDED_OVER and not p.vm.finished
            if not hasattr(MsgType, "MIGRATE_CHALLENGE"):
                return
            # A hostile destination: challenged, it fetches the chunks, then answers.
            body = await dest.remote.call(
                MsgType.MIGRATE_CHALLENGE, dest.signed(MsgType.MIGRATE_CHALLENGE)
            )
            challenge = migration.decode_challenge(body, {"memory": 8, "disk": 8})
            assert challenge["memory"] and challenge["disk"]  # only chunks that are not zero
            index = challenge["memory"][0]
            with pytest.raises(DrafterError, match="proves it has them"):
                await p.remotes[-1].fetch("memory", index)
            made_up = {name: ["00" * 16] * len(idx) for name, idx in challenge.items()}
            with pytest.raises(DrafterError, match="proof of possession failed") as e:
                await p.connect()  # (the refused fetch cost the destination its connection)
                again = p.remotes[-1]
                await again.call(
                    MsgType.MIGRATE_DONE, dest.signed(MsgType.MIGRATE_DONE, answers=made_up)
                )
            assert not no_migration(e.value)
            assert p.source.phase is Phase.HANDED_OVER and not p.vm.finished
            assert not p.vm.running_here and p.vm.resumes == 0

    run(main())


def test_the_proof_holds_the_chunks_as_handed_over_while_the_vm_writes_them(
    tmp_path: Path,
) -> None:
    """After the grant the VM writes its chunks here: their tags are taken before the
    first write, and a whole chunk it overwrites is fetched first all the same."""

    async def main() -> None:
        async with pair(tmp_path) as p:
            _write_chunks(p)
            dest = await p.destination()
            dest.rounds = 0
            await dest.precopy()
            await dest.switch_over()
            await dest.hand_over()
            memory = p.devices["memory"]
            await memory.ensure(0, 10, Priority.DEMAND)
            memory.write(0, b"the VM writes")  # a chunk it holds
            with pytest.raises(DrafterError, match="not local yet"):
                memory.write(CHUNK, b"w" * CHUNK)  # a whole chunk it never held
            await memory.ensure(CHUNK, CHUNK, Priority.DEMAND, partial_only=True)
            memory.write(CHUNK, b"w" * CHUNK)
            await dest.pull_missing()
            assert await dest.finish()
            assert p.source.phase is Phase.DONE and p.vm.finished is not None
            assert memory.proof_nonce is None  # no tags kept after the migration

    run(main())


def test_a_pre_copy_that_never_switches_over_ends_and_the_next_destination_migrates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 22, item 4: one chunk request every 2 s keeps a destination from looking
    silent (--offer-timeout 3 s here), but pre-copy must come to a switch-over within
    --precopy-timeout (5 s here): then it ends, the VM keeps running, and the next
    destination is not BUSY."""

    async def main() -> None:
        async with pair(tmp_path, offer_timeout=3, precopy_timeout=5) as p:
            _write_chunks(p)  # (chunks that are not zero: each fetch is a request)
            staller = await p.connect()
            body = offer_body() if hasattr(migration, "KeyShare") else b""
            await staller.call(MsgType.MIGRATE_OFFER, body)
            started = time.monotonic()
            index = 0
            while p.source.phase is Phase.PRECOPY and time.monotonic() - started < 9:
                await staller.fetch("memory", index % 6)
                index += 1
                await asyncio.sleep(2)
            assert p.source.phase is Phase.IDLE and p.vm.running_here
            assert time.monotonic() - started < 8
            said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
            assert any("made no progress to a switch-over in 5s" in m for m in said), said
            dest = await p.destination()
            await dest.precopy()  # not BUSY
            await dest.switch_over()
            await dest.hand_over()
            assert p.source.phase is Phase.HANDED_OVER

    run(main())


# -- failures before the hand-over: the source takes the VM back -------------------------


def test_a_failed_suspend_leaves_the_vm_at_the_source(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path, vm=FakeVM(fail_suspend=True)) as p:
            dest = await p.destination()
            await dest.precopy()
            with pytest.raises(DrafterError, match="switch-over failed"):
                await dest.switch_over()
            await dest.abort()  # refused: nothing to abort; the VM runs at the source
            assert p.source.phase is Phase.IDLE and p.vm.running_here

    run(main())


def test_an_abort_before_the_grant_resumes_the_vm_at_the_source(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path) as p:
            dest = await p.destination()
            await dest.precopy()
            await dest.switch_over()
            await dest.abort()  # e.g. QEMU could not load the state
            assert dest.phase is DestinationPhase.FAILED
            assert p.source.phase is Phase.IDLE and p.vm.running_here
            nxt = await p.destination()
            await nxt.precopy()  # the next destination can migrate it
            assert p.source.phase is Phase.PRECOPY

    run(main())


def test_after_the_grant_an_abort_is_refused_and_the_vm_stays_paused(tmp_path: Path) -> None:
    """Once granted the destination may have run the VM: an abort, even one that
    proves the migration key, must not make a second copy run at the source."""

    async def main() -> None:
        async with pair(tmp_path) as p:
            dest = await p.destination()
            await dest.precopy()
            await dest.switch_over()
            await dest.hand_over()
            await dest.abort()  # granted, never ran: says so, sends nothing
            assert dest.phase is DestinationPhase.FAILED
            assert p.source.phase is Phase.HANDED_OVER and not p.vm.running_here
            with pytest.raises(DrafterError, match="may have run at the destination") as e:
                await dest.remote.call(MsgType.MIGRATE_ABORT, dest.signed(MsgType.MIGRATE_ABORT))
            assert not no_migration(e.value)  # refused, not "taken back": it is still ours
            assert p.source.phase is Phase.HANDED_OVER and not p.vm.running_here
            assert p.vm.resumes == 0

    run(main())


def test_once_the_vm_ran_at_the_destination_an_abort_does_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path) as p:
            dest = await p.destination()
            await dest.precopy()
            await dest.switch_over()
            await dest.hand_over()
            dest.told_to_run = True
            await dest.abort()
            assert p.source.phase is Phase.HANDED_OVER and not p.vm.running_here

    run(main())


def test_lost_before_the_grant_the_source_resumes_after_its_rescue_timeout(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with pair(tmp_path, grace=0.3) as p:
            dest = await p.destination(handover_timeout=3)
            await dest.precopy()
            await dest.switch_over()
            p.proxy.refusing = True
            p.proxy.cut()
            await wait_until(lambda: p.vm.running_here)
            assert p.source.phase is Phase.IDLE
            p.proxy.refusing = False  # back: the hand-over is refused, this copy stops
            with pytest.raises(DrafterError, match="took the VM back"):
                await dest.hand_over()
            assert dest.phase is DestinationPhase.TAKEN_BACK
            assert p.vm.resumes == 1

    run(main())


def test_a_cut_before_the_grant_that_heals_completes_the_migration(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path, grace=5) as p:
            dest = await p.destination()
            await dest.precopy()
            await dest.switch_over()
            p.proxy.cut()  # the destination reconnects and asks again
            await dest.hand_over()
            assert p.source.phase is Phase.HANDED_OVER
            await dest.pull_missing()
            assert await dest.finish()
            assert p.source.phase is Phase.DONE and p.vm.resumes == 0

    run(main())


def test_with_no_rescue_timeout_only_the_operator_takes_the_vm_back(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path, grace=None) as p:
            dest = await p.destination()
            await dest.precopy()
            await dest.switch_over()
            refused = await p.source.take_back()
            assert "destination is connected" in refused and not p.vm.running_here
            for remote in p.remotes:
                await remote.close()
            await wait_until(lambda: p.source.destination_lost)
            await asyncio.sleep(0.3)
            assert not p.vm.running_here  # nobody resumes it by itself
            said = await p.source.take_back()
            assert "no write is lost" in said and p.vm.running_here

    run(main())


# -- after the grant: recovery, never a fork -----------------------------------------------


def test_a_cut_after_the_grant_is_recovered_and_never_resumed_at_the_source(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with pair(tmp_path, grace=0.2) as p:
            dest = await p.destination()
            await dest.precopy()
            await dest.switch_over()
            await dest.hand_over()
            p.proxy.refusing = True
            p.proxy.cut()
            await wait_until(lambda: p.source.destination_lost)
            await asyncio.sleep(0.5)  # past the rescue timeout
            assert p.source.phase is Phase.HANDED_OVER and not p.vm.running_here
            p.proxy.refusing = False
            await wait_until(lambda: not p.source.destination_lost)  # RESUME adopted it
            await dest.pull_missing()
            assert await dest.finish()
            assert p.source.phase is Phase.DONE and p.vm.resumes == 0

    run(main())


def test_a_lost_switch_over_answer_is_answered_again(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path) as p:
            dest = await p.destination()
            await dest.precopy()
            first = await dest.remote.call(MsgType.MIGRATE_SUSPENDED, encode_id(dest.migration_id))
            # The answer was lost on a cut: the destination, reconnected, asks again.
            again = await p.connect()
            body = dest.signed(MsgType.MIGRATE_SUSPENDED)
            assert await again.call(MsgType.MIGRATE_SUSPENDED, body) == first
            assert p.source.migrating is not None and p.vm.suspends == 1
            other = await p.connect()
            with pytest.raises(DrafterError, match="no such switched-over migration"):
                await other.call(MsgType.MIGRATE_SUSPENDED, encode_id("another"))
            await again.call(MsgType.MIGRATE_HANDOVER, dest.signed(MsgType.MIGRATE_HANDOVER))
            assert p.source.phase is Phase.HANDED_OVER
            assert p.source.migration is not None and p.source.migration.answer is None

    run(main())


def test_a_cut_during_the_switch_over_call_is_asked_again_and_completes(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with pair(tmp_path) as p:
            dest = await p.destination()
            await dest.precopy()
            switching = asyncio.ensure_future(dest.switch_over())
            await wait_until(lambda: p.source.phase is not Phase.PRECOPY)
            p.proxy.cut()  # the call or its answer is lost
            answer = await switching
            assert answer.state == b"STATE" * 100 and p.vm.suspends == 1
            await dest.hand_over()
            await dest.pull_missing()
            assert await dest.finish() and p.vm.resumes == 0

    run(main())


def test_a_lost_grant_answer_is_granted_again(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path) as p:
            dest = await p.destination()
            await dest.precopy()
            await dest.switch_over()
            # The source granted, the answer never came back: asked again, granted again.
            other = await p.connect()
            await other.call(MsgType.MIGRATE_HANDOVER, dest.signed(MsgType.MIGRATE_HANDOVER))
            assert p.source.phase is Phase.HANDED_OVER
            await dest.hand_over()
            assert dest.phase is DestinationPhase.RUNNING

    run(main())


def test_the_operator_takes_back_a_lost_destination_s_vm_and_is_told_the_cost(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with pair(tmp_path) as p:
            dest = await p.destination()
            await dest.precopy()
            await dest.switch_over()
            await dest.hand_over()
            p.proxy.refusing = True
            p.proxy.cut()
            await wait_until(lambda: p.source.destination_lost)
            said = await p.source.take_back()
            assert "writes the destination took since the hand-over are lost" in said
            assert p.vm.running_here and p.source.phase is Phase.IDLE
            p.proxy.refusing = False  # the destination comes back: refused, it stops
            await wait_until(lambda: dest.phase is DestinationPhase.TAKEN_BACK)

    run(main())


# -- hostile answers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "phases",
    [
        [],
        "x",
        {str(i): 1 for i in range(17)},
        {"a": -1},
        {"a": True},
        {"a": 1e9},
        {"a" * 33: 1},
        {"a": "1"},
        {"a": None},
    ],  # fmt: skip
)
def test_a_switch_over_answer_with_bad_phases_is_refused(phases: object) -> None:
    import json
    import struct

    head = json.dumps({"dirty": {"memory": [], "disk": []}, "paused_at": 1.0, "phases": phases})
    body = struct.pack(">I", len(head)) + head.encode() + b"state"
    with pytest.raises(ProtocolError):
        decode_suspended(body)


def test_a_switch_over_answer_round_trips() -> None:
    answer = SwitchOver({"memory": [1, 2], "disk": []}, 12.5, {"pause": 0.25}, b"\0state")
    assert decode_suspended(encode_suspended(answer)) == answer
    answer.inline = {"memory": {1: [(0, b"y" * 4), (50, b"z" * 50)], 2: [(0, b"x" * 100)]}}
    assert decode_suspended(encode_suspended(answer), {"memory": (300, 100)}) == answer


@pytest.mark.parametrize(
    "inline, tail, why",
    [
        ({"memory": [[3, 0, 64]]}, b"x" * 64, "not dirty"),
        ({"memory": [[1, 0, 64], [1, 0, 64]]}, b"x" * 128, "out of order"),
        ({"memory": [[2, 0, 8], [1, 0, 8]]}, b"x" * 16, "out of order"),
        ({"memory": [[1, 0, 16], [1, 8, 8]]}, b"x" * 24, "out of order"),
        ({"memory": [[1, 0, 64]]}, b"x" * 10, "is cut"),
        ({"memory": [[1, 60, 8]]}, b"x" * 8, "is cut"),
        ({"memory": [[1, 0, 0]]}, b"", "is cut"),
        ({"memory": [[1, 0, 64]]}, b"x" * 65, "bytes after"),
        ({"memory": [[9, 0, 64]]}, b"", "is cut"),
        ({"memory": [[1, 0]]}, b"", "malformed"),
        ({"memory": [1]}, b"", "malformed"),
        ({"disk2": [[1, 0, 1]]}, b"x", "malformed"),
        ({}, b"extra", "bytes after"),
    ],  # fmt: skip
)
def test_a_switch_over_answer_with_bad_inline_chunks_is_refused(inline, tail, why) -> None:
    import json
    import struct

    head = json.dumps({"dirty": {"memory": [1, 2, 9]}, "paused_at": 1.0, "state_size": 5,
                       "inline": inline}).encode()  # fmt: skip
    body = struct.pack(">I", len(head)) + head + b"state" + tail
    with pytest.raises(ProtocolError, match=why):
        decode_suspended(body, {"memory": (4 * 64, 64)})


@pytest.mark.parametrize("nonzero", [0, 3, 40, 200, 1000])
def test_the_challenge_is_random_non_zero_chunks_and_reads_few(tmp_path: Path, nonzero) -> None:
    """PROOF_CHUNKS non-zero chunks of each device (all of them if fewer), never a
    zero one, different from one challenge to the next, and found without reading
    every chunk of a mostly written device."""
    from drafter.migration.messages import PROOF_CHUNKS

    chunks = 1000
    device = Device("memory", chunks * 4096, None, tmp_path / "m", chunk_size=4096)
    written = sorted(set(range(0, chunks, max(1, chunks // nonzero))))[:nonzero] if nonzero else []
    for i in written:
        device.write(i * 4096, b"x")

    async def make() -> MigrationSource:  # it takes the running loop
        return MigrationSource({"memory": device}, b"{}", tmp_path / "mf", FakeVM().control())

    source = asyncio.run(make())
    reads = []
    real = device.read_chunk
    device.read_chunk = lambda i: (reads.append(i), real(i))[1]  # type: ignore[method-assign]
    first = source._choose_challenge()["memory"]
    assert set(first) <= set(written) and len(set(first)) == len(first)
    assert len(first) == min(PROOF_CHUNKS, len(written))
    if nonzero == chunks:
        assert len(reads) == PROOF_CHUNKS  # each chunk looked at was chosen
        assert first != source._choose_challenge()["memory"]  # at random
    device.close()
