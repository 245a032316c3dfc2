"""Checkpoints (src/drafter/checkpoint/writer.py, source.py, manifest.py) on real
devices over temporary files and a VM stand-in that pauses, saves a state and
resumes; the store in memory (tests/support/records.py) and, last, a real SeaweedFS.

What must hold whatever fails: a head only ever names a manifest whose every chunk
is in the store, and a failed checkpoint loses nothing (the next one takes its chunks
again)."""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path

import pytest

from drafter.checkpoint import Lease, LeaseFenced, ObjectRecords
from drafter.checkpoint import writer as writer_module
from drafter.checkpoint.lease import LeaseHeld
from drafter.checkpoint.manifest import (
    HEAD,
    MAX_LINKS,
    Head,
    Manifest,
    chunk_name,
    digest_of,
    generation_name,
    generation_of,
    patch_length,
    patch_pages,
)
from drafter.checkpoint.records import Records
from drafter.checkpoint.running import VMCheckpoints
from drafter.checkpoint.source import CheckpointSource
from drafter.checkpoint.writer import Checkpointer, open_head, read_manifest
from drafter.chunks import DEVICES, ZERO_HASH, Priority
from drafter.device import Device
from drafter.errors import DrafterError
from drafter.hashes import chunk_hash
from drafter.objects.location import StoreOptions
from drafter.objects.source import StoreError
from drafter.transport.inflight import VerificationError
from support.objectstores import FaultyProxy
from support.records import MemoryRecords, MemoryStore

CHUNK = 64 << 10
SIZES = {"kernel": 3 * CHUNK, "initramfs": 2 * CHUNK, "memory": 64 * CHUNK, "disk": 16 * CHUNK}


class FakeVM:
    """Real devices; a pause that saves ``state_bytes``; hooks for writes meanwhile."""

    def __init__(self, work: Path) -> None:
        self.devices = {
            name: Device(name, size, None, work / f"{name}.overlay", writable=True)
            for name, size in SIZES.items()
        }
        self.config = b'{"memory_mib": 4}'
        self.state_bytes = b"state" * 1000
        self.paused = False
        self.pauses = 0
        self.on_sync = None  # called at every memory sync (a write while it runs)
        self.in_pause_write: tuple[str, int, bytes] | None = None

    async def sync_memory(self) -> None:
        if self.on_sync is not None and not self.paused:
            self.on_sync()

    async def pause_and_save(self, state: Path) -> None:
        assert not self.paused
        self.paused = True
        self.pauses += 1
        if self.in_pause_write is not None:  # written just before the pause took
            name, offset, data = self.in_pause_write
            self.devices[name].write(offset, data)
            self.in_pause_write = None
        state.write_bytes(self.state_bytes)

    async def resume(self) -> None:
        assert self.paused
        self.paused = False

    def hot(self) -> dict[str, list[int]]:
        return {"memory": [0, 1], "disk": []}

    def busy(self) -> str | None:
        return None

    def content(self, name: str) -> bytes:
        d = self.devices[name]
        return d.read(0, d.size)


def fill(vm: FakeVM, seed: int = 1) -> None:
    rng = random.Random(seed)
    for device in vm.devices.values():
        for index in range(device.chunks):
            if rng.random() < 0.5:  # half the chunks stay all zeros
                device.write(index * CHUNK, rng.randbytes(CHUNK))


def check_store(records: MemoryRecords) -> Manifest | None:
    """The invariant: the head names a manifest whose every chunk is there."""
    objects = records.store.objects
    if HEAD not in objects:
        return None
    head = Head.parse(objects[HEAD][0], "")
    manifest = Manifest.parse(objects[head.manifest][0], head.manifest)
    for digest in manifest.digests():
        assert chunk_name(digest) in objects, f"the head names a missing chunk {digest.hex()}"
    for pack in manifest.packs():
        assert pack in objects, f"the head names a missing pack {pack}"
    return manifest


def lapse(store: MemoryStore) -> None:
    """The holder's lease as good as lapsed (released), without waiting a lease time."""
    record = json.loads(store.objects["lease"][0])
    record["released"] = True
    store.objects["lease"] = (json.dumps(record).encode(), '"lapsed"')


def chunks_in(records: MemoryRecords) -> int:
    return sum(1 for name in records.store.objects if digest_of(name) is not None)


async def writer(
    records: Records, vm: FakeVM, work: Path, holder: str = "a", keep: int = 3
) -> Checkpointer:
    lease = Lease(records, holder)
    await lease.acquire(may_wait=False)
    opened = await open_head(records, lease)
    checkpointer = Checkpointer(records, lease, vm, work, interval=3600, keep=keep, opened=opened)
    checkpointer.track()
    return checkpointer


async def restored(records: Records, manifest: Manifest, work: Path) -> dict[str, bytes]:
    """Every resource as a peer recovering from the generation would see it."""
    source = CheckpointSource(records, manifest)
    await source.connect()
    out = {}
    for name in ("state", *DEVICES):
        device = Device(name, source.manifest[name], None, work / f"r-{name}", source=source)
        device.expect(source.hashes[name])
        await device.ensure(0, device.size, Priority.DEMAND)
        out[name] = device.read(0, device.size)
        device.close()
    return out


def test_the_first_checkpoint_holds_everything_and_an_idle_one_uploads_nothing(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        store = MemoryStore()
        records = store.view("a")
        vm = FakeVM(tmp_path)
        fill(vm)
        checkpointer = await writer(records, vm, tmp_path)
        first = await checkpointer.checkpoint()
        manifest = check_store(records)
        assert manifest is not None and manifest.generation == first.generation == 1
        non_zero = sum(
            1 for name in DEVICES for i in range(vm.devices[name].chunks)
            if chunk_hash(vm.devices[name].read(i * CHUNK, CHUNK)) != ZERO_HASH
        )  # fmt: skip
        assert first.uploaded_chunks == non_zero + 1  # and the state's one chunk
        assert vm.pauses == 1 and not vm.paused
        idle = await checkpointer.checkpoint()
        assert idle.generation == 2 and idle.uploaded_bytes == idle.manifest_bytes
        vm.devices["memory"].write(5 * CHUNK + 100, b"changed")
        one = await checkpointer.checkpoint()
        # One page changed: a patch of one page in the generation's pack, no chunk.
        assert one.uploaded_chunks == 0 and one.uploaded_bytes - one.manifest_bytes == 4096
        manifest = check_store(records)
        assert manifest is not None and manifest.generation == 3
        got = await restored(records, manifest, tmp_path)
        for name in DEVICES:
            assert got[name] == vm.content(name), name
        assert got["state"] == vm.state_bytes
        assert manifest.config == vm.config and manifest.hot["memory"] == [0, 1]

    asyncio.run(go())


class GatedRecords(MemoryRecords):
    """Writes of names that ``stall(name)`` picks wait until ``go`` is set."""

    def __init__(self, store: MemoryStore, stall) -> None:
        super().__init__(store, "a")
        self.stall = stall
        self.go = asyncio.Event()
        self.waiting = asyncio.Event()

    async def put(self, name: str, data: bytes) -> None:
        if self.stall(name):
            self.waiting.set()
            await self.go.wait()
        await super().put(name, data)


def test_a_switch_over_stops_a_checkpoint_still_copying_without_a_pause(tmp_path: Path) -> None:
    async def go() -> None:
        records = GatedRecords(MemoryStore(), lambda name: digest_of(name) is not None)
        vm = FakeVM(tmp_path)
        fill(vm)
        checkpointer = await writer(records, vm, tmp_path)
        running = asyncio.ensure_future(checkpointer.checkpoint())
        await asyncio.wait_for(records.waiting.wait(), 10)  # uploading chunks
        await asyncio.wait_for(checkpointer.hold(), 5)  # at once, not after the uploads
        with pytest.raises(writer_module.CheckpointYielded):
            await running
        assert vm.pauses == 0 and HEAD not in records.store.objects
        checkpointer.unhold()
        records.go.set()
        stats = await checkpointer.checkpoint()  # takes every chunk again
        manifest = check_store(records)
        assert manifest is not None and manifest.generation == stats.generation
        got = await restored(records, manifest, tmp_path)
        assert all(got[name] == vm.content(name) for name in DEVICES)

    asyncio.run(go())


def test_a_switch_over_waits_for_a_checkpoint_past_its_pause(tmp_path: Path) -> None:
    async def go() -> None:
        records = GatedRecords(MemoryStore(), lambda name: generation_of(name) is not None)
        vm = FakeVM(tmp_path)
        fill(vm)
        checkpointer = await writer(records, vm, tmp_path)
        running = asyncio.ensure_future(checkpointer.checkpoint())
        await asyncio.wait_for(records.waiting.wait(), 10)  # writing its manifest
        held = asyncio.ensure_future(checkpointer.hold())
        await asyncio.sleep(0.05)
        assert not held.done() and vm.pauses == 1
        records.go.set()
        stats = await running
        await asyncio.wait_for(held, 5)
        manifest = check_store(records)
        assert manifest is not None and manifest.generation == stats.generation == 1
        checkpointer.unhold()

    asyncio.run(go())


def test_patches_grow_with_the_pages_written_until_the_chunk_is_stored_whole_again(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        store = MemoryStore()
        records = store.view("a")
        vm = FakeVM(tmp_path)
        fill(vm)
        checkpointer = await writer(records, vm, tmp_path)
        await checkpointer.checkpoint()
        memory = vm.devices["memory"]
        chunks = [memory.read(i * CHUNK, CHUNK) for i in range(memory.chunks)]
        zero = next(i for i, data in enumerate(chunks) if data == bytes(CHUNK))
        full = next(i for i, data in enumerate(chunks) if data != bytes(CHUNK))
        sizes = []
        for page in range(5):  # the same chunk, one more page each time, and a zero one
            memory.write(full * CHUNK + page * 4096, os.urandom(100))
            memory.write(zero * CHUNK + 8, b"on a zero chunk %d" % page)  # its one page
            stats = await checkpointer.checkpoint()
            sizes.append((stats.uploaded_chunks, stats.uploaded_bytes - stats.manifest_bytes))
            manifest = check_store(records)
            assert manifest is not None
            got = await restored(records, manifest, tmp_path / str(page))
            assert got["memory"] == vm.content("memory")
        # Each generation adds a link of the pages written since the last one: one page
        # of each chunk; at 5 of 16 pages patched the chunk goes whole again, while
        # the zero chunk stays a patch on zeros.
        assert sizes[:4] == [(0, 2 * 4096)] * 4, sizes
        assert sizes[4] == (1, CHUNK + 4096), sizes
        patched = manifest.patches["memory"]
        assert full not in patched and patched[zero].base == ZERO_HASH
        assert len(patched[zero].links) == 5  # a link per generation
        for n in range(6):  # past MAX_LINKS the chain folds into one link
            memory.write(zero * CHUNK + 4096 + n, b"again %d" % n)
            await checkpointer.checkpoint()
        manifest = check_store(records)
        assert manifest is not None
        assert len(manifest.patches["memory"][zero].links) < MAX_LINKS
        got = await restored(records, manifest, tmp_path / "folded")
        assert got["memory"] == vm.content("memory")
        # A recovered writer carries the patches on.
        lease = Lease(store.view("b"), "b")
        lapse(store)
        await lease.acquire(may_wait=False)
        opened = await open_head(store.view("b"), lease)
        again = Checkpointer(store.view("b"), lease, vm, tmp_path, opened=opened)
        again.track()
        stats = await again.checkpoint()
        assert stats.uploaded_chunks == 0, "nothing changed since the generation it took"

    for sub in [*map(str, range(5)), "folded"]:
        (tmp_path / sub).mkdir()
    asyncio.run(go())


@pytest.mark.parametrize("small_round", [8 << 20, 0])  # 0: every round, and a last look
def test_writes_during_precopy_and_at_the_pause_are_in_the_generation(
    tmp_path: Path, monkeypatch, small_round: int
) -> None:
    monkeypatch.setattr(writer_module, "SMALL_ROUND", small_round)

    async def go() -> None:
        store = MemoryStore()
        records = store.view("a")
        vm = FakeVM(tmp_path)
        fill(vm)
        checkpointer = await writer(records, vm, tmp_path)
        await checkpointer.checkpoint()
        counter = iter(range(1000))

        def busy_guest() -> None:  # the guest writes while each round runs
            n = next(counter)
            vm.devices["memory"].write((n % 64) * CHUNK, os.urandom(CHUNK))
            vm.devices["disk"].write((n % 16) * CHUNK + 7, b"disk write %d" % n)

        vm.on_sync = busy_guest
        vm.in_pause_write = ("memory", 63 * CHUNK, b"the last write before the pause")
        stats = await checkpointer.checkpoint()
        assert stats.rounds >= 1
        manifest = check_store(records)
        assert manifest is not None
        got = await restored(records, manifest, tmp_path)
        for name in DEVICES:  # exactly the devices as they were at the pause
            assert got[name] == vm.content(name), name

    asyncio.run(go())


@pytest.mark.parametrize("fault", ["chunks", "manifest", "head"])
def test_a_fault_during_a_checkpoint_leaves_the_previous_generation_and_loses_nothing(
    tmp_path: Path, fault: str
) -> None:
    async def go() -> None:
        store = MemoryStore()
        records = store.view("a")
        vm = FakeVM(tmp_path)
        fill(vm)
        checkpointer = await writer(records, vm, tmp_path)
        await checkpointer.checkpoint()
        vm.devices["memory"].write(9 * CHUNK, b"a write the failed checkpoint carried")
        vm.devices["disk"].write(3 * CHUNK, os.urandom(CHUNK))
        puts = 0
        real_put = records.put

        async def failing_put(name: str, data: bytes) -> None:
            nonlocal puts
            kind = "manifest" if generation_of(name) else "chunks"
            if kind == fault:
                raise StoreError(f"{name}: 503 Service Unavailable")
            puts += 1
            await real_put(name, data)

        records.put = failing_put  # type: ignore[method-assign]
        if fault == "head":
            real_replace = records.replace

            async def cut(name: str, data: bytes, version: str) -> str:
                raise StoreError("the connection was cut")

            records.replace = cut  # type: ignore[method-assign]
        with pytest.raises(StoreError):
            await checkpointer.checkpoint()
        manifest = check_store(records)
        assert manifest is not None and manifest.generation == 1  # still the latest
        assert not vm.paused  # the VM runs on
        records.put = real_put  # type: ignore[method-assign]
        if fault == "head":
            records.replace = real_replace  # type: ignore[method-assign]
        await checkpointer.checkpoint()
        manifest = check_store(records)
        assert manifest is not None and manifest.generation == checkpointer.generation == 3
        got = await restored(records, manifest, tmp_path)
        for name in DEVICES:
            assert got[name] == vm.content(name), name

    asyncio.run(go())


def test_a_recoverer_fences_the_head_and_the_old_holder_commits_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        store = MemoryStore()
        old_records = store.view("old")
        vm = FakeVM(tmp_path)
        fill(vm)
        old = await writer(old_records, vm, tmp_path, "old")
        await old.checkpoint()
        # The old holder's lease lapses (it was cut off); a recoverer takes it over.
        lapse(store)
        new_records = store.view("new")
        lease = Lease(new_records, "new")
        assert await lease.acquire(may_wait=False) == 2
        opened = await open_head(new_records, lease)
        assert opened.manifest is not None and opened.manifest.generation == 1
        assert Head.parse(store.objects[HEAD][0], "").epoch == 2
        # The old holder, unaware (its lease still looks valid to it), tries a commit.
        vm.devices["memory"].write(0, b"a write the old copy took after it was replaced")
        with pytest.raises(LeaseFenced):
            await old.checkpoint()
        assert check_store(new_records).generation == 1  # type: ignore[union-attr]
        head = Head.parse(store.objects[HEAD][0], "")
        assert head.holder == "new" and head.manifest == generation_name(1, 1)

    asyncio.run(go())


def test_old_generations_expire_and_their_chunks_go_but_never_the_heads(tmp_path: Path) -> None:
    async def go() -> None:
        store = MemoryStore()
        records = store.view("a")
        vm = FakeVM(tmp_path)
        fill(vm)
        checkpointer = await writer(records, vm, tmp_path, keep=2)
        await checkpointer.checkpoint()
        before = chunks_in(records)
        for n in range(4):
            vm.devices["memory"].write(n * CHUNK, os.urandom(CHUNK))  # replaced bytes
            await checkpointer.checkpoint()
        manifests = [n for n in store.objects if generation_of(n)]
        assert sorted(generation_of(n)[0] for n in manifests) == [4, 5]  # type: ignore[index]
        manifest = check_store(records)
        assert manifest is not None
        # Each of the 4 rewrites replaced one chunk: the first 2 replaced ones are gone.
        assert chunks_in(records) == before + 2
        got = await restored(records, manifest, tmp_path)
        assert got["memory"] == vm.content("memory")

    asyncio.run(go())


def test_a_recovered_source_refuses_a_changed_or_missing_chunk(tmp_path: Path) -> None:
    async def go() -> None:
        store = MemoryStore()
        records = store.view("a")
        vm = FakeVM(tmp_path)
        fill(vm)
        checkpointer = await writer(records, vm, tmp_path)
        await checkpointer.checkpoint()
        manifest = check_store(records)
        assert manifest is not None
        digest = next(h for h in manifest.hashes["memory"] if h != ZERO_HASH)
        data, version = store.objects[chunk_name(digest)]
        store.objects[chunk_name(digest)] = (b"X" + data[1:], version)
        with pytest.raises(VerificationError):
            await restored(records, manifest, tmp_path / "a")
        store.objects[chunk_name(digest)] = (data + b"more", version)
        with pytest.raises(StoreError):  # longer than a chunk can be: refused unread
            await restored(records, manifest, tmp_path / "b")
        del store.objects[chunk_name(digest)]
        with pytest.raises(StoreError, match="missing"):
            await restored(records, manifest, tmp_path / "c")

    for sub in "abc":
        (tmp_path / sub).mkdir()
    asyncio.run(go())


def _manifest_doc() -> dict[str, object]:
    manifest = Manifest(
        3, 1, 1.0, CHUNK, b"{}", {"state": 10, "kernel": CHUNK, "initramfs": 0,
                                  "memory": 2 * CHUNK, "disk": CHUNK},
        {"state": [b"s" * 32], "kernel": [b"k" * 32], "initramfs": [],
         "memory": [b"m" * 32, ZERO_HASH], "disk": [b"d" * 32]},
        {"memory": [1]},
    )  # fmt: skip
    return json.loads(manifest.to_bytes())


@pytest.mark.parametrize(
    "change",
    [
        {"format": 2},
        {"generation": 0},
        {"generation": True},
        {"epoch": -1},
        {"chunk_size": 1000},
        {"chunk_size": 1 << 40},
        {"config": "not base64!"},
        {"resources": {}},
        {"resources": None},
        {"hot": {"memory": [2]}},
        {"hot": {"memory": [-1]}},
        {"hot": {"kernel": [0]}},
        {"created": "yesterday"},
    ],
)
def test_a_hostile_manifest_is_refused_with_one_line(change: dict[str, object]) -> None:
    doc = _manifest_doc()
    assert Manifest.parse(json.dumps(doc).encode(), "m").generation == 3
    doc.update(change)
    with pytest.raises(DrafterError, match="is not a checkpoint manifest"):
        Manifest.parse(json.dumps(doc).encode(), "m")


PACK = "packs/000000000003-000000000001"
LINK = [PACK, 0, 4096, "1"]


@pytest.mark.parametrize(
    "patch",
    [
        [1, "ab" * 32, [LINK]],  # the disk has one chunk: no chunk 1
        [0, "ab" * 31, [LINK]],
        [0, "AB" * 32, [LINK]],
        [0, "ab" * 32, []],  # no link
        [0, "ab" * 32, [LINK] * 9],  # a chain longer than any writer makes
        [0, "ab" * 32, [["../chunks/x", 0, 4096, "1"]]],
        [0, "ab" * 32, [[PACK, 0, 4095, "1"]]],  # not the length of its pages
        [0, "ab" * 32, [[PACK, 0, 0, "0"]]],
        [0, "ab" * 32, [[PACK, -1, 4096, "1"]]],
        [0, "ab" * 32, [[PACK, 0, 4096, "1" * 100]]],  # pages past the chunk
        [0, "ab" * 32, [[PACK, 0, 4096]]],
        [0, "ab" * 32, LINK],
        "not a list",
    ],
)
def test_a_hostile_patch_entry_is_refused(patch: object) -> None:
    doc = _manifest_doc()
    resources = doc["resources"]
    good = [0, "ab" * 32, [[PACK, 8, 8192, "3"], [PACK, 0, 4096, "4"]]]
    resources["disk"]["patches"] = [good]  # type: ignore[index]
    manifest = Manifest.parse(json.dumps(doc).encode(), "m")
    patch0 = manifest.patches["disk"][0]
    assert patch0.links[0].length == 8192 and patch0.mask == 7 and manifest.packs() == {PACK}
    resources["disk"]["patches"] = [patch]  # type: ignore[index]
    with pytest.raises(DrafterError, match="is not a checkpoint manifest"):
        Manifest.parse(json.dumps(doc).encode(), "m")


def _slow_patch_length(mask: int, n: int) -> int:
    return sum(max(0, min(4096, n - p * 4096)) for p in range(mask.bit_length()) if mask >> p & 1)


def _slow_patch_pages(mask: int, n: int) -> list[tuple[int, int]]:
    pages = [p for p in range(-(-n // 4096)) if mask >> p & 1]
    runs: list[tuple[int, int]] = []
    for p in pages:
        start, end = p * 4096, min(n, p * 4096 + 4096)
        if runs and sum(runs[-1]) == start:
            runs[-1] = (runs[-1][0], end - runs[-1][0])
        else:
            runs.append((start, end - start))
    return runs


def test_patch_lengths_and_runs_match_a_page_by_page_count() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.choice([4096, 65536, 65536 - 100, 3 * 4096 + 1, 1 << 20])
        pages = -(-n // 4096)
        mask = rng.getrandbits(pages + rng.choice([0, 0, 3]))  # now and then past the end
        if rng.random() < 0.3:
            mask |= ((1 << rng.randrange(1, pages + 1)) - 1) << rng.randrange(pages)
        assert patch_length(mask, n) == _slow_patch_length(mask, n), (hex(mask), n)
        assert patch_pages(mask, n) == _slow_patch_pages(mask, n), (hex(mask), n)


def test_a_manifest_of_the_largest_chunks_with_every_page_patched_parses() -> None:
    """64 MiB chunks, every link's mask all ones (16384 pages), as many links as a
    manifest may hold: counted once per link, not once per page."""
    size = 64 << 20
    full = (1 << (size // 4096)) - 1
    link = [PACK, 0, size, f"{full:x}"]
    doc = _manifest_doc()
    doc["chunk_size"] = size
    resources = doc["resources"]
    resources["memory"]["size"] = 2 * size  # type: ignore[index]
    resources["disk"]["size"] = size  # type: ignore[index]
    resources["memory"]["patches"] = [[i, "ab" * 32, [link] * MAX_LINKS] for i in range(2)]  # type: ignore[index]
    manifest = Manifest.parse(json.dumps(doc).encode(), "m")
    assert manifest.patches["memory"][1].mask == full
    assert patch_pages(full, size) == [(0, size)]


@pytest.mark.parametrize("epoch", [1, 2])
def test_a_manifest_whose_name_gives_another_epoch_is_refused(epoch: int) -> None:
    async def go() -> None:
        records = MemoryRecords(MemoryStore(), "a")
        doc = _manifest_doc()  # generation 3 by the holder of epoch 1
        await records.create(generation_name(3, epoch), json.dumps(doc).encode())
        if epoch == 1:
            assert (await read_manifest(records, generation_name(3, 1), 3)).epoch == 1
            with pytest.raises(DrafterError, match="names generation 3"):
                await read_manifest(records, generation_name(3, 1), 4)
        else:
            with pytest.raises(DrafterError, match="at epoch 1"):
                await read_manifest(records, generation_name(3, 2), 3)

    asyncio.run(go())


def test_a_manifest_whose_hashes_do_not_match_its_sizes_is_refused() -> None:
    doc = _manifest_doc()
    doc["resources"]["memory"]["size"] = 3 * CHUNK  # type: ignore[index]
    with pytest.raises(DrafterError):
        Manifest.parse(json.dumps(doc).encode(), "m")
    for data in (b"[" * 100000, b"\xff", b"{}", b"null", b"x" * (65 << 20)):
        with pytest.raises(DrafterError):
            Manifest.parse(data, "m")


@pytest.mark.parametrize(
    "change",
    [
        {"manifest": "generations/x"},
        {"manifest": "generations/000000000004-000000000001"},  # another generation's
        {"manifest": "generations/000000000003-000000000009"},  # a newer epoch's
        {"manifest": "../../lease"},
        {"generation": 0},
        {"epoch": 0},
        {"holder": ""},
        {"committed": None},
    ],
)
def test_a_hostile_head_is_refused(change: dict[str, object]) -> None:
    doc = json.loads(Head(3, generation_name(3, 1), 2, 1.0, "a").to_bytes())
    assert Head.parse(json.dumps(doc).encode(), "").generation == 3
    doc.update(change)
    with pytest.raises(DrafterError, match="is not a checkpoint head"):
        Head.parse(json.dumps(doc).encode(), "")


def test_names_are_parsed_strictly() -> None:
    assert generation_of(generation_name(7, 2)) == (7, 2)
    for bad in ("generations/7-2", "generations/000000000007", "chunks/00",
                "generations/00000000000٧-000000000002"):  # fmt: skip
        assert generation_of(bad) is None
    digest = bytes(range(32))
    assert digest_of(chunk_name(digest)) == digest
    assert digest_of("chunks/" + digest.hex().upper()) is None
    assert digest_of("chunks/zz") is None


def test_checkpoints_on_seaweedfs(tmp_path: Path, seaweed) -> None:
    """The same writer and source on a real S3 store: conditional heads, listings,
    deletes, and a second holder refused while the first holds the lease."""

    async def go() -> None:
        env = seaweed.env()
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            records = ObjectRecords(f"s3://drafter/unit-checkpoints-{os.getpid()}")
            vm = FakeVM(tmp_path)
            fill(vm)
            checkpointer = await writer(records, vm, tmp_path, keep=1)
            await checkpointer.checkpoint()
            vm.devices["disk"].write(0, os.urandom(CHUNK))
            stats = await checkpointer.checkpoint()
            assert stats.generation == 2 and stats.uploaded_chunks == 1
            current = await records.read(HEAD)
            assert current is not None
            head = Head.parse(current.data, records.where)
            manifest = await read_manifest(records, head.manifest, head.generation)
            names = await records.list("")
            assert [n for n in names if generation_of(n)] == [head.manifest]
            for digest in manifest.digests():
                assert chunk_name(digest) in names
            got = await restored(records, manifest, tmp_path)
            assert got["disk"] == vm.content("disk")
            with pytest.raises(DrafterError, match="held by a"):
                await Lease(records, "b").acquire(may_wait=False)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    asyncio.run(go())


def test_a_new_vm_takes_no_prefix_another_vm_holds(tmp_path: Path, seaweed, monkeypatch) -> None:
    """A lease and no head (another VM before its first commit, or one that died
    then): refused at once, never waited out; a head: refused, naming --raddr."""
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    url = f"s3://drafter/unit-take-{os.getpid()}-{random.getrandbits(32):x}"
    options = StoreOptions(retry_timeout=5)

    async def go() -> None:
        first = VMCheckpoints(url, options, lease_time=30, interval=3600, keep=2)
        await first.take(recovering=False)
        second = VMCheckpoints(url, options, lease_time=30, interval=3600, keep=2)
        with pytest.raises(LeaseHeld, match="another VM is being checkpointed"):
            await asyncio.wait_for(second.take(recovering=False), 10)
        vm = FakeVM(tmp_path)
        fill(vm)
        checkpointer = Checkpointer(first.records, first.lease, vm, tmp_path, opened=first.opened)
        checkpointer.track()
        await checkpointer.checkpoint()
        await first.lease.release()
        third = VMCheckpoints(url, options, lease_time=30, interval=3600, keep=2)
        with pytest.raises(DrafterError, match="--raddr"):
            await third.take(recovering=False)
        await third.take(recovering=True)  # released: at once
        assert third.opened.manifest is not None and third.opened.manifest.generation == 1
        await third.lease.release()

    asyncio.run(go())


def test_503s_from_the_store_fail_a_checkpoint_cleanly_and_retries_carry_one_through(
    tmp_path: Path, seaweed, monkeypatch
) -> None:
    """A real SeaweedFS behind a proxy that answers 503 itself: while every upload of
    chunks, of the pack, of the manifest or of the head is refused, the checkpoint
    fails and the store's head still names a whole generation; with a third of all
    requests refused, the store client's retries carry the checkpoint through."""
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    proxy = FaultyProxy(seaweed.port)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        url = f"s3://drafter/unit-503-{os.getpid()}"
        faulty = ObjectRecords(url, StoreOptions(retry_timeout=1.0, request_timeout=5.0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
        direct = ObjectRecords(url)

        async def go() -> None:
            vm = FakeVM(tmp_path)
            fill(vm)
            checkpointer = await writer(faulty, vm, tmp_path)
            await checkpointer.checkpoint()
            memory = vm.devices["memory"]
            for n, part in enumerate(["chunks/", "packs/", "generations/", "/head"]):
                memory.write(n * CHUNK, os.urandom(CHUNK))  # a whole new chunk
                memory.write(20 * CHUNK + n * 4096, b"a patch %d" % n)  # and a page
                proxy.fail_puts = part
                with pytest.raises(StoreError):
                    await checkpointer.checkpoint()
                assert not vm.paused
                current = await direct.read(HEAD)
                assert current is not None
                head = Head.parse(current.data, "")
                assert head.generation == 1, part
                manifest = await read_manifest(direct, head.manifest, head.generation)
                names = set(await direct.list(""))
                assert {chunk_name(d) for d in manifest.digests()} <= names
                assert manifest.packs() <= names
            proxy.fail_puts = None
            for n in range(10):  # enough requests that some meet a 503
                memory.write((30 + n) * CHUNK, os.urandom(CHUNK))
            proxy.flaky = 0.3
            refused = proxy.refused
            stats = await checkpointer.checkpoint()
            assert proxy.refused > refused  # retried through 503s
            proxy.flaky = 0.0
            current = await direct.read(HEAD)
            assert current is not None
            head = Head.parse(current.data, "")
            assert head.generation == stats.generation == 6  # after 4 failed attempts
            manifest = await read_manifest(direct, head.manifest, head.generation)
            got = await restored(direct, manifest, tmp_path)
            for name in DEVICES:  # every write the failed ones carried is there
                assert got[name] == vm.content(name), name

        asyncio.run(go())
    finally:
        proxy.close()


def test_a_write_between_the_take_and_the_read_is_in_the_patch(tmp_path: Path) -> None:
    async def go() -> None:
        store = MemoryStore()
        records = store.view("a")
        vm = FakeVM(tmp_path)
        fill(vm)
        checkpointer = await writer(records, vm, tmp_path)
        await checkpointer.checkpoint()
        memory = vm.devices["memory"]
        chunks = [memory.read(i * CHUNK, CHUNK) for i in range(memory.chunks)]
        index = next(i for i, data in enumerate(chunks) if data != bytes(CHUNK))
        memory.write(index * CHUNK, b"page 0, before the take")
        real = memory.read_unsaved
        raced = []

        def racing(i: int) -> tuple[bytes, int]:
            if i == index and not raced:  # the guest writes after the take, before the read
                raced.append(i)
                memory.write(index * CHUNK + 2 * 4096, b"page 2, after the take")
            return real(i)

        memory.read_unsaved = racing  # type: ignore[method-assign]
        await checkpointer.checkpoint()
        memory.read_unsaved = real  # type: ignore[method-assign]
        assert raced
        for _ in range(2):  # and on: the page was in the bytes read, it stays right
            manifest = check_store(records)
            assert manifest is not None
            got = await restored(records, manifest, tmp_path / str(manifest.generation))
            assert got["memory"] == vm.content("memory")
            await checkpointer.checkpoint()

    for n in range(2, 5):
        (tmp_path / str(n)).mkdir()
    asyncio.run(go())


def test_a_head_write_whose_answer_was_lost_counts_as_committed(tmp_path: Path) -> None:
    async def go() -> None:
        store = MemoryStore()
        records = store.view("a")
        vm = FakeVM(tmp_path)
        fill(vm)
        checkpointer = await writer(records, vm, tmp_path)
        await checkpointer.checkpoint()
        real = records.replace

        async def lost(name: str, data: bytes, version: str) -> str:
            await real(name, data, version)
            if name == HEAD:
                raise StoreError("the connection was cut before the answer")
            return version

        records.replace = lost  # type: ignore[method-assign]
        vm.devices["memory"].write(0, b"carried by a commit whose answer was lost")
        stats = await checkpointer.checkpoint()  # read back: it is ours, committed
        records.replace = real  # type: ignore[method-assign]
        assert stats.generation == 2 and checkpointer.generation == 2
        vm.devices["memory"].write(0, b"the next one")
        assert (await checkpointer.checkpoint()).generation == 3  # not fenced
        manifest = check_store(records)
        assert manifest is not None
        got = await restored(records, manifest, tmp_path)
        assert got["memory"] == vm.content("memory")

    asyncio.run(go())


@pytest.mark.parametrize("epoch", ["2", None, 2.5, [2], {"e": 2}, True])
def test_a_head_with_an_epoch_of_another_type_is_refused_in_one_line(epoch: object) -> None:
    doc = json.loads(Head(3, generation_name(3, 1), 2, 1.0, "a").to_bytes())
    doc["epoch"] = epoch
    with pytest.raises(DrafterError, match="is not a checkpoint head"):
        Head.parse(json.dumps(doc).encode(), "")
