"""Continuous checkpoints of a running VM into object storage (docs/checkpoints.md).

One :meth:`Checkpointer.checkpoint` makes one generation, in this order:

1. **Pre-copy into the store**, while the VM runs: sync the memory file, take the
   chunks changed since the last checkpoint (:meth:`Device.take_unsaved`), read and
   hash them, upload those the store does not hold yet (``chunks/<hash>``, content
   addressed: the same bytes are one object however often they recur). Up to
   ``rounds`` rounds, fewer once a round finds little.
2. **The pause**: pause the VM, save its device state, sync memory, take the last
   changed chunks and copy them out, resume. This is all the VM stops for.
3. **Commit**, while the VM runs again: upload those chunks and the state's, write
   the generation's manifest, then the head record naming it, with a conditional
   write on the version of the head this holder wrote last (``If-Match``). Only the
   head makes a generation visible: a failure or a kill anywhere before it leaves the
   previous generation the latest, and every chunk a head names was uploaded before it.
4. **Expiry**: manifests beyond the newest ``keep`` go, then every chunk no kept
   manifest names (never one the head's generation needs).

The lease (:mod:`drafter.checkpoint.lease`) is checked before the commit, and a head
written meanwhile by a holder of a newer epoch fails the condition: this copy is
fenced (:class:`~drafter.checkpoint.lease.LeaseFenced`) and writes nothing more.

A checkpoint that fails gives its chunks back (:meth:`Device.give_back_unsaved`):
the next one takes them again, nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from drafter.checkpoint.lease import Lease, LeaseFenced, LeasePhase
from drafter.checkpoint.manifest import (
    CHUNKS,
    GENERATIONS,
    HEAD,
    MAX_LINKS,
    MAX_MANIFEST,
    PACKS,
    Head,
    Link,
    Manifest,
    Patch,
    chunk_name,
    digest_of,
    generation_name,
    generation_of,
    pack_name,
    pack_of,
    patch_length,
    patch_pages,
)
from drafter.checkpoint.records import RecordConflict, Records
from drafter.chunks import DEVICES, TRACKED, ZERO_HASH, chunk_length
from drafter.device import Device
from drafter.errors import DrafterError
from drafter.hashes import chunk_hash
from drafter.objects.source import StoreError
from drafter.snapshot import failpoint

if TYPE_CHECKING:
    from drafter.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 30.0
DEFAULT_KEEP = 3
UPLOADS = 128  # uploads in flight: 1 Gbit/s at 200 ms is 100 chunks of 256 KiB
READ_BATCH = 64  # chunks read and hashed per trip to a worker thread
SMALL_ROUND = 8 << 20  # a pre-copy round that found at most this many bytes is the last
PATCH_SHARE = 4  # a chunk is patched while its pages written since its base are <= 1/4 of it


@dataclass(frozen=True)
class Entry:
    """What the store holds for one chunk: its hash, and how to make it (stored whole
    as ``chunks/<hash>``, all zeros, or ``patch`` applied to a whole chunk)."""

    hash: bytes
    patch: Patch | None = None


class CheckpointVM(Protocol):
    """What a checkpoint needs of the running VM (on the main loop)."""

    devices: dict[str, Device]
    config: bytes

    async def sync_memory(self) -> None:
        """Push the pages the guest dirtied in QEMU's mapping down to the device."""
        ...

    async def pause_and_save(self, state: Path) -> None:
        """Pause the VM and save its device state to ``state``."""
        ...

    async def resume(self) -> None:
        """Let the paused VM run on."""
        ...

    def hot(self) -> dict[str, list[int]]:
        """The hot set as known now (tracked device -> chunks)."""
        ...

    def busy(self) -> str | None:
        """Why a checkpoint must wait now (a migration under way), or None."""
        ...


@dataclass
class CheckpointStats:
    """One committed generation, for the status line, the metrics and the bench."""

    generation: int = 0
    paused_at: float = 0.0  # wall clock: the VM as it was then is the generation
    committed_at: float = 0.0  # wall clock
    pause_s: float = 0.0
    total_s: float = 0.0
    uploaded_bytes: int = 0  # chunks, patches and the manifest
    manifest_bytes: int = 0
    uploaded_chunks: int = 0
    changed_bytes: int = 0  # bytes of the chunks read because they changed
    rounds: int = 0


@dataclass
class _Attempt:
    """What one checkpoint took from the devices (given back if it fails) and the
    entries it made (kept only once it commits), its pack of patches."""

    pack: str
    taken: dict[str, dict[int, int]] = field(default_factory=dict)
    entries: dict[tuple[str, int], Entry] = field(default_factory=dict)
    # The pages of each patched chunk as last read (the pack is made of the last only).
    pages: dict[tuple[str, int], bytes] = field(default_factory=dict)

    def pack_patches(self) -> bytes:
        """The pack of this generation's links; their entries get their offsets."""
        pack = bytearray()
        for key, data in sorted(self.pages.items()):
            entry = self.entries[key]
            assert entry.patch is not None
            *older, last = entry.patch.links
            link = Link(self.pack, len(pack), len(data), last.mask)
            self.entries[key] = Entry(entry.hash, Patch(entry.patch.base, (*older, link)))
            pack += data
        return bytes(pack)

    def add(self, name: str, chunks: dict[int, int]) -> None:
        mine = self.taken.setdefault(name, {})
        for index, mask in chunks.items():
            mine[index] = mine.get(index, 0) | mask


@dataclass(frozen=True)
class Opened:
    """The head as a new holder found and fenced it: the latest committed generation
    (None: there is none yet), its manifest's name, the head's version now."""

    manifest: Manifest | None = None
    name: str = ""
    version: str | None = None
    committed: float = 0.0  # wall clock of its commit


async def open_head(records: Records, lease: Lease) -> Opened:
    """After ``lease`` was taken: the latest committed generation, and the head
    rewritten with this holder's epoch, so that any later commit of an older holder
    fails its condition (it is fenced)."""
    where = records.where
    current = await records.read(HEAD)
    if current is None:
        return Opened()
    head = Head.parse(current.data, where)
    if head.epoch > lease.epoch:
        raise LeaseFenced(f"{where}{HEAD} was written at epoch {head.epoch}: not ours")
    manifest = await read_manifest(records, head.manifest, head.generation)
    fenced = Head(head.generation, head.manifest, lease.epoch, head.committed, lease.holder)
    try:
        version = await records.replace(HEAD, fenced.to_bytes(), current.version)
    except RecordConflict:
        raise LeaseFenced(f"{where}{HEAD} changed while the lease was taken over") from None
    return Opened(manifest, head.manifest, version, head.committed)


async def read_manifest(records: Records, name: str, generation: int) -> Manifest:
    """The manifest ``name`` of ``generation``, checked; DrafterError if missing or bad."""
    data = await records.get(name, MAX_MANIFEST)
    if data is None:
        raise DrafterError(f"{records.where}{name} is missing")
    manifest = Manifest.parse(data, f"{records.where}{name}")
    named = (manifest.generation, manifest.epoch)
    if manifest.generation != generation or generation_of(name) != named:
        raise DrafterError(
            f"{records.where}{name} names generation {manifest.generation} "
            f"at epoch {manifest.epoch}"
        )
    return manifest


class CheckpointYielded(DrafterError):
    """A checkpoint still copying into the store gave way to a migration's switch-over
    (:meth:`Checkpointer.hold`): it ended without a pause, the next one takes its
    chunks again."""


class Checkpointer:
    """Generations of one VM under ``records`` (``s3://BUCKET/PREFIX/``), while
    ``lease`` is held."""

    def __init__(
        self,
        records: Records,
        lease: Lease,
        vm: CheckpointVM,
        work: Path,
        interval: float = DEFAULT_INTERVAL,
        keep: int = DEFAULT_KEEP,
        rounds: int = 3,
        opened: Opened | None = None,
    ) -> None:
        if keep < 1:
            raise DrafterError("--checkpoint-keep must be at least 1")
        self.records = records
        self.lease = lease
        self.vm = vm
        self.state_path = work / "checkpoint-state"
        self.interval = interval
        self.keep = keep
        self.rounds = rounds
        self.generation = 0  # the latest committed one (0: none yet)
        self.last: CheckpointStats | None = None  # the latest committed by this copy
        self.committed = 0  # generations this copy committed
        self.failed = 0  # checkpoints that failed (the previous generation stayed)
        self._head_version: str | None = None
        self._entries: dict[str, list[Entry | None]] = {}  # chunk -> what the store has
        self._known: set[bytes] = set()  # whole chunks the store holds
        # kept manifest -> the whole chunks and the packs it needs
        self._manifests: dict[str, tuple[set[bytes], set[str]]] = {}
        self.metrics: Metrics | None = None
        self._asked = asyncio.Event()
        self._lock = asyncio.Lock()
        self._held = False  # by a migration's switch-over (hold)
        self._precopy: asyncio.Future[None] | None = None  # the rounds under way, if any
        self._attempted = 0  # the generation number the last attempt took
        if opened is not None and opened.manifest is not None:
            manifest = opened.manifest
            self.generation = manifest.generation
            self._head_version = opened.version
            self._known = manifest.digests()
            self._manifests[opened.name] = (self._known.copy(), manifest.packs())
            for name in DEVICES:
                patched = manifest.patches.get(name, {})
                self._entries[name] = [
                    Entry(h, patched.get(i)) for i, h in enumerate(manifest.hashes[name])
                ]

    def track(self) -> None:
        """Start tracking changes: every chunk counts as changed until the first
        checkpoint took it (it reads what the store does not hold yet)."""
        for name in DEVICES:
            device = self.vm.devices[name]
            device.track_unsaved()
            mine = self._entries.get(name)
            if mine is None or len(mine) != device.chunks:
                self._entries[name] = [None] * device.chunks

    # -- checkpoints ------------------------------------------------------------------------

    async def hold(self) -> None:
        """Start no checkpoint until :meth:`unhold` (a migration's switch-over: its
        pause must not meet a checkpoint's). One still copying into the store gives
        way at once (CheckpointYielded; it has not paused the VM); one past its pause
        is waited for (it only uploads the pause's few chunks and commits)."""
        if not self._held:
            if self._precopy is not None:
                self._precopy.cancel()
            await self._lock.acquire()
            self._held = True

    def unhold(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()

    def adopt(self, lease: Lease, opened: Opened) -> None:
        """The lease was taken again (a migration given up after the hand-over)."""
        self.lease = lease
        self._head_version = opened.version

    def request(self) -> None:
        """Ask for a checkpoint at once (a signal, before maintenance)."""
        self._asked.set()

    async def run(self, ready: Awaitable[object]) -> None:
        """Checkpoint at once once ``ready`` (every chunk is local), then every
        ``interval`` seconds and whenever asked, until fenced (LeaseFenced)."""
        await ready
        while True:
            reason = self.vm.busy()
            if reason is not None:
                log.debug("checkpoint deferred: %s", reason)
                await asyncio.sleep(1.0)
                continue
            try:
                await self.checkpoint()
            except LeaseFenced:
                raise
            except CheckpointYielded:
                log.info("checkpoint %d gave way to a migration's switch-over", self._attempted)
            except (DrafterError, OSError) as e:
                self.failed += 1
                if self.metrics is not None:
                    self.metrics.checkpoint_failed()
                log.warning("checkpoint failed (generation %d stays the latest): %s",
                            self.generation, e)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._asked.wait(), self.interval)
            self._asked.clear()

    async def checkpoint(self, final: bool = False) -> CheckpointStats:
        """Make and commit one generation; its figures. ``final``: the VM stays paused
        after it (it stops here: the generation holds its last write)."""
        async with self._lock:
            # A number of its own for every attempt: one whose head write may have
            # landed (its answer lost) must never be written over by the next.
            self._attempted = max(self._attempted, self.generation) + 1
            attempt = _Attempt(pack_name(self._attempted, self.lease.epoch))
            try:
                return await self._checkpoint(attempt, final)
            except BaseException:
                for name, chunks in attempt.taken.items():
                    self.vm.devices[name].give_back_unsaved(chunks)
                raise

    def _check_lease(self) -> None:
        """Fenced: LeaseFenced (stop for good). Not valid now (the store is away, the
        lease lapsed): this checkpoint fails, a later one may succeed."""
        if self.lease.phase is LeasePhase.FENCED:
            self.lease.check()
        if not self.lease.valid():
            raise DrafterError(f"the lease is {self.lease.phase.value} now: no checkpoint")

    async def _checkpoint(self, attempt: _Attempt, final: bool) -> CheckpointStats:
        self._check_lease()
        start = time.monotonic()
        stats = CheckpointStats(generation=self._attempted)
        deferred: list[tuple[bytes, bytes]] = []
        precopy = self._precopy = asyncio.ensure_future(
            self._precopy_rounds(attempt, stats, deferred)
        )
        try:
            await precopy
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task itself was cancelled, not only its rounds
            raise CheckpointYielded(f"checkpoint {stats.generation} gave way") from None
        finally:
            self._precopy = None
        failpoint("checkpoint-before-pause")
        paused = time.monotonic()
        created = time.time()
        last: dict[tuple[str, int], tuple[int, bytes]] = {}
        await self.vm.pause_and_save(self.state_path)
        try:
            await self.vm.sync_memory()
            for name in TRACKED:
                chunks = self.vm.devices[name].take_unsaved()
                attempt.add(name, chunks)
                last.update(await asyncio.to_thread(_copy_out, self.vm.devices[name], chunks))
        finally:
            if not final:
                await self.vm.resume()
            stats.pause_s = time.monotonic() - paused
        await self._upload(deferred, stats)
        await self._round(attempt, stats, last)
        state = await asyncio.to_thread(self.state_path.read_bytes)
        chunk_size = self.vm.devices["memory"].chunk_size
        state_hashes = await self._upload_bytes(state, chunk_size, stats)
        failpoint("checkpoint-before-manifest")
        pack = attempt.pack_patches()
        if pack:
            await self.records.put(attempt.pack, pack)
            stats.uploaded_bytes += len(pack)
        hashes: dict[str, list[bytes]] = {"state": state_hashes}
        patches: dict[str, dict[int, Patch]] = {}
        sizes = {"state": len(state)}
        entries = self._merged(attempt)
        for name in DEVICES:
            mine = entries[name]
            if any(e is None for e in mine):
                raise DrafterError(f"checkpoint: chunks of {name} were never read")
            hashes[name] = [e.hash for e in mine if e is not None]
            patches[name] = {i: e.patch for i, e in enumerate(mine) if e and e.patch}
            sizes[name] = self.vm.devices[name].size
        manifest = Manifest(
            stats.generation, self.lease.epoch, created, chunk_size,
            self.vm.config, sizes, hashes, self.vm.hot(), patches,
        )  # fmt: skip
        name = generation_name(stats.generation, self.lease.epoch)
        encoded = manifest.to_bytes()
        await self.records.put(name, encoded)
        stats.uploaded_bytes += len(encoded)
        stats.manifest_bytes = len(encoded)
        failpoint("checkpoint-before-head")
        await self._commit(manifest, name)
        attempt.taken.clear()  # committed: nothing to give back any more
        self._entries = entries
        stats.committed_at = time.time()
        stats.paused_at = created
        stats.total_s = time.monotonic() - start
        self.generation = stats.generation
        self.last = stats
        self.committed += 1
        if self.metrics is not None:
            self.metrics.checkpoint_committed(
                stats.generation, created, stats.pause_s, stats.uploaded_bytes
            )
        log.info(
            "checkpoint %d committed (the VM as at %.3f): %.1f MiB uploaded, paused %.0f ms, "
            "%.1f s in all", stats.generation, created, stats.uploaded_bytes / (1 << 20),
            stats.pause_s * 1000, stats.total_s,
        )  # fmt: skip
        self._manifests[name] = (manifest.digests(), manifest.packs())
        try:
            await self._expire()
        except DrafterError as e:  # the commit stands; expiry is tried again next time
            log.warning("could not expire old checkpoints: %s", e)
        return stats

    async def _precopy_rounds(
        self, attempt: _Attempt, stats: CheckpointStats, deferred: list[tuple[bytes, bytes]]
    ) -> None:
        """Pre-copy into the store, the VM running: rounds until one finds little,
        then (if the last still found much) a look that only reads, its uploads
        left in ``deferred`` until the VM runs again: what the pause copies out is
        then only what changed during that look, not during a round of uploads."""
        found = SMALL_ROUND + 1
        for _ in range(self.rounds):
            await self.vm.sync_memory()
            found = await self._round(attempt, stats, None)
            stats.rounds += 1
            if found <= SMALL_ROUND:
                break
        if found > SMALL_ROUND:
            await self.vm.sync_memory()
            await self._round(attempt, stats, None, deferred)

    async def _commit(self, manifest: Manifest, name: str) -> None:
        """The head names the new generation: the one conditional write that commits."""
        self._check_lease()
        head = Head(manifest.generation, name, self.lease.epoch, time.time(), self.lease.holder)
        where = self.records.where
        data = head.to_bytes()
        try:
            if self._head_version is None:
                self._head_version = await self.records.create(HEAD, data)
            else:
                self._head_version = await self.records.replace(HEAD, data, self._head_version)
        except (RecordConflict, StoreError) as e:
            # The write may have landed with its answer lost: then it is committed.
            with contextlib.suppress(StoreError):
                current = await self.records.read(HEAD)
                if current is not None and current.data == data:
                    self._head_version = current.version
                    return
            if isinstance(e, StoreError):
                raise
            raise LeaseFenced(
                f"{where}{HEAD} was written by another holder: this copy was replaced "
                "and writes nothing more"
            ) from None

    def _merged(self, attempt: _Attempt) -> dict[str, list[Entry | None]]:
        """The entries as they are once ``attempt`` commits."""
        merged = {name: list(entries) for name, entries in self._entries.items()}
        for (name, index), entry in attempt.entries.items():
            merged[name][index] = entry
        return merged

    def _entry(self, attempt: _Attempt, name: str, index: int) -> Entry | None:
        entry = attempt.entries.get((name, index))
        return entry if entry is not None else self._entries[name][index]

    async def _round(
        self,
        attempt: _Attempt,
        stats: CheckpointStats,
        final: dict[tuple[str, int], tuple[int, bytes]] | None,
        deferred: list[tuple[bytes, bytes]] | None = None,
    ) -> int:
        """One pre-copy round (``final`` None: take the changed chunks now and read
        them) or the pause's chunks (``final``: their masks and bytes, copied out);
        their entries made, the new whole chunks uploaded (or added to ``deferred``,
        for later). Returns the bytes read."""
        read = 0
        uploads: list[tuple[bytes, bytes]] = []
        if final is None:
            for name in DEVICES:
                device = self.vm.devices[name]
                chunks = device.take_unsaved()
                attempt.add(name, chunks)
                todo = []
                for index in sorted(chunks):
                    known = device.hashes[index]
                    current = self._entry(attempt, name, index)
                    if known is not None and current is not None and current.hash == known:
                        continue  # written back unchanged
                    if known is not None and (known == ZERO_HASH or known in self._known):
                        attempt.entries[(name, index)] = Entry(known)
                    else:
                        todo.append(index)
                for at in range(0, len(todo), READ_BATCH):
                    batch = todo[at : at + READ_BATCH]
                    got = await asyncio.to_thread(_read_hashed, device, batch)
                    for index, (data, digest, since) in got.items():
                        read += len(data)
                        mask = chunks[index] | since  # what the bytes read may differ in
                        self._place(attempt, name, index, mask, data, digest, uploads)
                    if len(uploads) >= UPLOADS * 2 and deferred is None:
                        await self._upload(uploads, stats)
                        uploads = []
        else:
            hashed = await asyncio.to_thread(
                lambda: {key: (m, data, chunk_hash(data)) for key, (m, data) in final.items()}
            )
            for (name, index), (mask, data, digest) in hashed.items():
                read += len(data)
                self._place(attempt, name, index, mask, data, digest, uploads)
        if deferred is not None:
            deferred.extend(uploads)
        else:
            await self._upload(uploads, stats)
        stats.changed_bytes += read
        log.debug("checkpoint %d: %s changed; %d KiB of patches", stats.generation,
                  ", ".join(f"{n} {len(c)}" for n, c in attempt.taken.items()),
                  sum(map(len, attempt.pages.values())) >> 10)  # fmt: skip
        return read

    def _place(
        self,
        attempt: _Attempt,
        name: str,
        index: int,
        mask: int,
        data: bytes,
        digest: bytes,
        uploads: list[tuple[bytes, bytes]],
    ) -> None:
        """The entry of a chunk read now (``data``, its hash ``digest``; ``mask``: its
        pages written since the last checkpoint took it): unchanged, a whole chunk the
        store holds, its patch with one more link (the pages written since; links of
        this generation are one), folded into one link when the chain is long, or a new
        whole chunk to upload once the pages patched are more than a quarter of it."""
        current = self._entry(attempt, name, index)
        key = (name, index)
        if current is not None and current.hash == digest:
            return
        pending = attempt.pages.pop(key, None) is not None
        if digest == ZERO_HASH or digest in self._known:
            attempt.entries[key] = Entry(digest)
            return
        base: bytes | None = None
        links: tuple[Link, ...] = ()
        if current is not None and current.patch is not None:
            base, links = current.patch.base, current.patch.links
            if pending:  # this generation's link so far: it grows, it is not added to
                *rest, last = links
                links, mask = tuple(rest), mask | last.mask
        elif current is not None and (current.hash == ZERO_HASH or current.hash in self._known):
            base = current.hash
        n = len(data)
        patched = mask
        for link in links:
            patched |= link.mask
        if base is None or patch_length(patched, n) * PATCH_SHARE > n:
            attempt.entries[key] = Entry(digest)
            uploads.append((digest, data))
            return
        if len(links) >= MAX_LINKS:  # fold the chain into one link
            links, mask = (), patched
        pages = b"".join(data[at : at + length] for at, length in patch_pages(mask, n))
        attempt.pages[key] = pages  # placed in the pack at the end (pack_patches)
        link = Link(attempt.pack, 0, len(pages), mask)
        attempt.entries[key] = Entry(digest, Patch(base, (*links, link)))

    async def _upload_bytes(
        self, data: bytes, chunk_size: int, stats: CheckpointStats
    ) -> list[bytes]:
        """``data`` (the VMM state) as chunks in the store; their hashes."""
        view = memoryview(data)
        hashes = []
        uploads = []
        for start in range(0, len(data), chunk_size):
            piece = bytes(view[start : start + chunk_size])
            digest = chunk_hash(piece)
            hashes.append(digest)
            if digest != ZERO_HASH and digest not in self._known:
                uploads.append((digest, piece))
        await self._upload(uploads, stats)
        return hashes

    async def _upload(self, uploads: list[tuple[bytes, bytes]], stats: CheckpointStats) -> None:
        """Put every (hash, bytes) not yet in the store, :data:`UPLOADS` at a time."""
        slots = asyncio.Semaphore(UPLOADS)
        seen: set[bytes] = set()

        async def one(digest: bytes, data: bytes) -> None:
            async with slots:
                await self.records.put(chunk_name(digest), data)
            self._known.add(digest)
            stats.uploaded_bytes += len(data)
            stats.uploaded_chunks += 1

        todo = []
        for digest, data in uploads:
            if digest not in seen and digest not in self._known:
                seen.add(digest)
                todo.append(one(digest, data))
        results = await asyncio.gather(*todo, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _expire(self) -> None:
        """Keep the newest ``keep`` generations; remove every other manifest (older
        ones, and attempts that never committed), then every chunk and pack no kept
        manifest needs (nor one this copy's VM needs now). A generation's committed
        manifest is the one of the highest epoch: a holder of a newer epoch only ever
        writes generations above the head it took over."""
        names = await self.records.list(GENERATIONS)
        newest: dict[int, tuple[int, str]] = {}
        for name in names:
            parsed = generation_of(name)
            if parsed is None or parsed[0] > self.generation:
                continue
            generation, epoch = parsed
            if generation not in newest or newest[generation][0] < epoch:
                newest[generation] = (epoch, name)
        kept = {newest[g][1]: g for g in sorted(newest)[-self.keep :]}
        dropped = [n for n in names if n not in kept and _older(n, self.generation)]
        if not dropped:
            return
        needed: set[bytes] = set()
        packs: set[str] = set()
        for name, generation in kept.items():
            if name not in self._manifests:
                manifest = await read_manifest(self.records, name, generation)
                self._manifests[name] = (manifest.digests(), manifest.packs())
            needed |= self._manifests[name][0]
            packs |= self._manifests[name][1]
        for entries in self._entries.values():
            for entry in entries:
                if entry is None:
                    continue
                if entry.patch is not None:
                    needed.add(entry.patch.base)
                    packs.update(link.pack for link in entry.patch.links)
                else:
                    needed.add(entry.hash)
        await self._delete(dropped)  # the manifests first: nothing names what goes next
        for name in dropped:
            self._manifests.pop(name, None)
        unneeded = []
        for name in await self.records.list(CHUNKS):
            digest = digest_of(name)
            if digest is not None and digest not in needed:
                unneeded.append(name)
                self._known.discard(digest)
        for name in await self.records.list(PACKS):
            parsed = pack_of(name)
            if parsed is not None and parsed[0] <= self.generation and name not in packs:
                unneeded.append(name)
        self._known &= needed
        await self._delete(unneeded)
        log.debug("expired %d manifest(s) and %d object(s)", len(dropped), len(unneeded))

    async def _delete(self, names: list[str]) -> None:
        """Remove ``names``, :data:`UPLOADS` at a time (a far store: one round trip each)."""
        slots = asyncio.Semaphore(UPLOADS)

        async def one(name: str) -> None:
            async with slots:
                await self.records.delete(name)

        results = await asyncio.gather(*map(one, names), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result


def _older(name: str, generation: int) -> bool:
    """Whether the manifest ``name`` is of a generation up to ``generation``."""
    parsed = generation_of(name)
    return parsed is not None and parsed[0] <= generation


def _read_hashed(device: Device, indices: list[int]) -> dict[int, tuple[bytes, bytes, int]]:
    """Chunks ``indices`` of ``device`` (local) with their hashes and the pages written
    since they were taken (in the bytes read too) (a worker thread)."""
    out = {}
    for index in indices:
        data, since = device.read_unsaved(index)
        out[index] = (data, chunk_hash(data), since)
    return out


def _copy_out(device: Device, chunks: dict[int, int]) -> dict[tuple[str, int], tuple[int, bytes]]:
    """Chunks ``chunks`` of ``device`` (index -> pages written), copied out while the
    VM is paused."""
    out = {}
    for index, mask in sorted(chunks.items()):
        data, _ = device.read_chunk(index)
        if len(data) != chunk_length(device.size, device.chunk_size, index):
            raise DrafterError(f"device {device.name}: chunk {index} read short")
        out[(device.name, index)] = (mask, data)
    return out
