"""A peer: one VM started from a remote without downloading it first (a registry's
package, lazily), or migrated here from another peer; then served on for the next
migration.

:class:`Peer` is the orchestrator, on the main loop, with an explicit phase
(:class:`PeerPhase`). Each role is an object of its own: the sources and the lazy
devices over them (:mod:`.sources`), the pull workers (:mod:`.pull`, device loop), the
migration to here (:mod:`.incoming`), and serving the VM on (:mod:`.serving`). The
main loop reaches the device loop only through :mod:`drafter.loops` (the session's
``host.run`` and ``host.submit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from drafter import loops, snapshot
from drafter.checkpoint.running import VMCheckpoints, holds_checkpoints, store_options
from drafter.chunkcache import Filling, take_cached
from drafter.chunks import DEVICES, Priority
from drafter.device import Device
from drafter.devicefs import DeviceHost, unmount_stale_under
from drafter.errors import DrafterError
from drafter.index import index_key
from drafter.migration.source import Phase as SourcePhase
from drafter.network.follow import Follower
from drafter.objects import is_object_url
from drafter.peer.incoming import IncomingMigration
from drafter.peer.options import PeerOptions
from drafter.peer.pull import PullPool
from drafter.peer.serving import Serving
from drafter.peer.sources import CheckpointSource, Sources, take_local_chunks
from drafter.peer.summary import MigrationSummary, PullProgress
from drafter.session import HotSet, VMSession
from drafter.transport.server import ChunkServer
from drafter.vmm.qemu import QemuMachine

log = logging.getLogger(__name__)

HOT_LIMIT = 128 << 20  # bytes of a device's hot set passed on to the next host
# Chunks per request for what a lazy start asks for first (state, kernel, initramfs,
# the hot set), where they follow each other: an object store answers a few 4 MiB
# ranges far faster than hundreds of single chunks (bench/sources.py).
FIRST_RUN = 16


class PeerPhase(enum.Enum):
    """Where a peer's VM is in its life on this host."""

    CONNECTING = "connecting"  # reaching the sources, building the devices
    STARTING = "starting"  # from a package at rest: state and first chunks, then resume
    MIGRATING_IN = "migrating in"  # from a running peer: pre-copy, switch-over, hand-over
    RUNNING = "running"  # the VM runs here (its chunks may still be arriving)
    SERVING = "serving"  # and is served on for the next migration
    MIGRATED_AWAY = "migrated away"  # the next host holds everything and runs it
    TAKEN_BACK = "taken back"  # the source resumed the VM itself: this copy must stop
    CLOSED = "closed"  # stopped here (or its start failed)


PEER_TRANSITIONS: dict[PeerPhase, frozenset[PeerPhase]] = {
    PeerPhase.CONNECTING: frozenset({PeerPhase.STARTING, PeerPhase.MIGRATING_IN}),
    PeerPhase.STARTING: frozenset({PeerPhase.RUNNING}),
    PeerPhase.MIGRATING_IN: frozenset({PeerPhase.RUNNING, PeerPhase.TAKEN_BACK}),
    PeerPhase.RUNNING: frozenset({PeerPhase.SERVING, PeerPhase.TAKEN_BACK}),
    PeerPhase.SERVING: frozenset({PeerPhase.MIGRATED_AWAY, PeerPhase.TAKEN_BACK}),
    PeerPhase.MIGRATED_AWAY: frozenset(),
    PeerPhase.TAKEN_BACK: frozenset(),
    PeerPhase.CLOSED: frozenset(),
}


class Peer:
    """One VM started from a remote source: lazy start and migration on top of a
    :class:`drafter.session.VMSession` (devices that fetch from the remote). ``start``,
    then ``close``."""

    def __init__(self, options: PeerOptions) -> None:
        self.options = options
        self._phase = PeerPhase.CONNECTING
        self.vm: VMSession | None = None  # devices, mount, QEMU: the VM on this host
        self.sources: Sources | None = None
        self.incoming: IncomingMigration | None = None  # a migration to here
        self.serving: Serving | None = None  # serving it on for the next migration
        self.hot: HotSet | None = None
        self.progress = PullProgress()
        self.resume_seconds = 0.0
        self.on_progress: Callable[[PullProgress], None] | None = None
        self.summary = MigrationSummary(source=options.raddr)
        self.migrated_away = asyncio.Event()  # the next host runs the VM: stop
        # Set when the source took the VM back (it resumed it itself after losing us):
        # this copy must stop.
        self.taken_back = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pull: asyncio.Future[None] | None = None  # the background pull's outcome
        self._done: asyncio.Future[bool] | None = None  # the source told it is done
        self._first: asyncio.Future[list[None]] | None = None  # the start's first chunks
        self._prefetches: list[asyncio.Future[None]] = []
        # Clients follow the VM: the gate of the namespace's address, the stable address.
        self.follow = Follower(options.netns, options.state_dir, options.stable_address)
        # Its checkpoints and lease (--checkpoint, or a raddr that names checkpoints).
        self.checkpoints: VMCheckpoints | None = None
        self.recovered = ""  # what a recovery resumed (the generation, its age)
        # Set when another peer took the VM's lease over: this copy must stop for good.
        self.fenced = asyncio.Event()
        self.fenced_reason = ""

    @property
    def phase(self) -> PeerPhase:
        """Where the VM is in its life on this host (PEER_TRANSITIONS says what follows)."""
        return self._phase

    def _to(self, new: PeerPhase) -> None:
        """The one place the phase changes; only along PEER_TRANSITIONS (or to CLOSED).
        A peer taken back stays so until it is closed, whatever step it was in."""
        old = self._phase
        if old is PeerPhase.TAKEN_BACK and new is not PeerPhase.CLOSED:
            return
        if new is not PeerPhase.CLOSED and new not in PEER_TRANSITIONS[old]:
            raise AssertionError(f"peer: {old.value} -> {new.value}")
        self._phase = new
        log.debug("peer: %s -> %s", old.value, new.value)

    @property
    def host(self) -> DeviceHost | None:
        """The device loop (FUSE, chunk fetches, the migration's protocol)."""
        return self.vm.host if self.vm is not None else None

    @property
    def machine(self) -> QemuMachine | None:
        """The VM's QEMU (its session's)."""
        return self.vm.machine if self.vm is not None else None

    @property
    def devices(self) -> dict[str, Device]:
        """The VM's devices by resource name (its session's; empty before the start)."""
        return self.vm.devices if self.vm is not None else {}

    @property
    def server(self) -> ChunkServer | None:
        """The server this VM is served on for the next migration, once it listens."""
        return self.serving.server if self.serving is not None else None

    # -- start -----------------------------------------------------------------

    async def start(self) -> float:
        """Connect, resume the VM, call AfterResume; return seconds from start to resumed."""
        start = time.monotonic()
        self._loop = asyncio.get_running_loop()
        try:
            await self._start()
        except BaseException:
            metrics = self.options.metrics
            if metrics is not None and self.incoming is not None and self._done is None:
                metrics.destination_failed()  # after the resume, _done counts the outcome
            if self.checkpoints is not None and self.checkpoints.checkpointer is None:
                # It never ran here: the lease goes first (a migration's source takes
                # it back before it resumes the VM; another host may take it at once).
                with contextlib.suppress(Exception):
                    await self.checkpoints.lease.release()
            if self.incoming is not None:
                # Never ran here: the source resumes the VM at once, not after a timeout.
                with contextlib.suppress(Exception):
                    await self.incoming.abort()
            await self.close()
            raise
        self.resume_seconds = time.monotonic() - start
        self.summary.total_s = self.resume_seconds
        return self.resume_seconds

    async def _start(self) -> None:
        o = self.options
        root = Path(o.work_root)
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_peers(root)
        work = Path(tempfile.mkdtemp(prefix=f"peer.{os.getpid()}.", dir=root))
        self.vm = vm = VMSession(work)
        host = vm.host
        generation = await self._take_lease()
        sources = self.sources = Sources.open(o, generation)
        if o.metrics is not None:
            for source in sources.all:
                o.metrics.attach_remote(source)
        await host.run(sources.connect())
        config = sources.check()
        if self.checkpoints is not None and generation is None and sources.at_rest:
            await self.checkpoints.take(recovering=False)  # a new VM: its prefix is empty
        await asyncio.to_thread(self.follow.prepare, not sources.at_rest)
        for name in DEVICES:  # each in the session as soon as it exists: closed with it
            vm.devices[name] = sources.device(name, work / f"{name}.cache")
        if o.local_package is not None:
            self.summary.reused = await asyncio.to_thread(
                take_local_chunks, self.devices, o.local_package
            )
        if sources.cache is not None:  # what this host holds already is not moved
            wired = {n: d for n, d in self.devices.items() if isinstance(d.source, Filling)}
            await asyncio.to_thread(take_cached, wired, sources.cache)
        self.progress.total = sum(d.size for d in self.devices.values())
        pool = PullPool(self.devices, o.pull_workers, self.progress, self._report)
        machine = vm.mount(config, o.netns, o.accel)
        granted = None
        if sources.at_rest:  # a registry: the snapshot is at rest
            self._to(PeerPhase.STARTING)
            state = sources.device("state", work / "state")
            # At once: the state with what QEMU reads when it starts, the hot chunks;
            # QEMU starts meanwhile and waits for the state. The background pull starts
            # once the VM runs: before, its bytes and their checks take the two cores
            # QEMU's start needs (measured: first reply 0.3 s later at 0 ms RTT, all
            # chunks local 0.1-0.3 s sooner; bench/objectstore.py).
            await host.run(self._request_first(state))
            if o.resume_threshold < 1.0:  # the resume waits for the pull: start it now
                self._pull = asyncio.wrap_future(host.submit(self._pull_all(pool)))
            began = time.monotonic()

            async def when(what: str, step: Awaitable[None]) -> None:
                await step
                log.debug("%s after %.0f ms", what, (time.monotonic() - began) * 1000)

            await asyncio.gather(
                when("QEMU waits for the state", machine.prepare_incoming()),
                when("state, kernel and initramfs local", host.run(self._wait_first())),
            )
            state.close()
        else:  # a running peer: migrate it here
            self._to(PeerPhase.MIGRATING_IN)
            self.summary.migrated = True
            incoming = self.incoming = IncomingMigration(
                o, sources.control, self.devices, host, pool, self.summary, self._taken_back
            )
            if self.checkpoints is not None:  # the source hands the lease over with the VM
                incoming.destination.lease_holder = self.checkpoints.lease.holder
                incoming.before_run = self.checkpoints.take_handed
            # QEMU starts now and waits for the state: its start is not downtime.
            await machine.prepare_incoming()
            await host.run(incoming.switch_over(vm.state))
            self._pull = asyncio.wrap_future(host.submit(self._pull_all(pool)))
            granted = incoming.granted()
        if o.resume_threshold < 1.0:
            await self._wait_until_missing_at_most(o.resume_threshold)
        here = self.incoming
        first = (lambda: here.cached) if here is not None else None
        self.hot = HotSet(vm, o.hot_window, first, HOT_LIMIT)
        self.hot.start()
        timings = snapshot.Timings()
        try:
            await asyncio.wait_for(vm.resume(timings, granted, self._followed), o.resume_timeout)
        except TimeoutError:
            raise DrafterError(f"the VM did not resume within {o.resume_timeout:.0f}s") from None
        self._to(PeerPhase.RUNNING)
        if self._pull is None:
            self._pull = asyncio.wrap_future(host.submit(self._pull_all(pool)))
        sources.keep_trying()
        if self.checkpoints is not None:
            assert vm.machine is not None
            self.checkpoints.start(
                self.devices, sources.config, vm.machine, self.follow, work, self._hot_now,
                self._migrating, self.wait_pulled(), self._fenced, o.metrics,
            )  # fmt: skip
        if self.incoming is not None:
            self.incoming.summarise(timings)
            self._done = asyncio.ensure_future(self._tell_done(self.incoming))
            if o.metrics is not None:
                s = self.summary
                o.metrics.migrated_in(s.downtime_s, s.precopy_s, s.switch_s, s.rounds, self._done)
        if o.laddr:
            await self._serve(sources.config)

    async def _take_lease(self) -> CheckpointSource | None:
        """With checkpoints: take the VM's lease before anything else. A raddr that
        names a prefix of checkpoints (s3://BUCKET/PREFIX) is a recovery: wait for the
        last holder's lease to lapse, then resume the latest committed generation
        (returned) and checkpoint there on."""
        o = self.options
        store = store_options(o.retry_timeout, o.tls_ca, o.s3_virtual_hosted)
        url = o.checkpoint
        recovering = False
        if is_object_url(o.raddr) and o.raddr.lower().startswith("s3://"):
            recovering = await holds_checkpoints(o.raddr, store)
        if recovering:
            if url not in (None, o.raddr):
                raise DrafterError(
                    "a VM resumed from its checkpoints checkpoints where it came from: "
                    f"leave --checkpoint out (or give {o.raddr})"
                )
            url = o.raddr
        if url is None:
            return None
        self.checkpoints = checkpoints = VMCheckpoints(
            url, store, o.lease_time, o.checkpoint_interval, o.checkpoint_keep
        )
        if not recovering:
            return None  # taken once the sources say whether the VM migrates here
        await checkpoints.take(recovering=True)
        self.recovered = checkpoints.describe()
        log.info("%s", self.recovered)
        return checkpoints.source()

    def _migrating(self) -> str | None:
        """Why a checkpoint must wait: a migration away is under way."""
        if self.serving is not None and self.serving.source.phase is not SourcePhase.IDLE:
            return f"a migration is {self.serving.source.phase.value}"
        return None

    def _fenced(self, why: str) -> None:
        """Another peer took the VM over (or checkpoints cannot go on): stop for good."""
        if not self.fenced.is_set():
            self.fenced_reason = why
            log.error("%s", why)
            self.fenced.set()

    def checkpoint_now(self) -> None:
        """Ask for a checkpoint at once (SIGUSR2; for example before maintenance)."""
        if self.checkpoints is not None:
            self.checkpoints.request()

    async def stop_checkpoints(self, final: bool = True) -> str | None:
        """Before a clean stop: a final checkpoint (the VM stays paused) and the lease
        released, so another host may resume the VM at once; what was done."""
        if self.checkpoints is None:
            return None
        return await self.checkpoints.stop(final)

    def _hot_now(self) -> dict[str, list[int]]:
        return self.hot.now() if self.hot is not None else {}

    async def _serve(self, config: bytes) -> None:
        """Serve this VM on ``laddr`` so another peer can migrate it away."""
        assert self.vm is not None
        self.serving = Serving(
            self.options, self.vm, config, self.follow, self._hot_now, self._migrated_away,
            self.checkpoints,
        )  # fmt: skip
        await self.serving.start(may_wait=self.incoming is not None)
        self._to(PeerPhase.SERVING)

    def _migrated_away(self) -> None:
        """The next host holds everything and runs the VM (main loop)."""
        if PeerPhase.MIGRATED_AWAY in PEER_TRANSITIONS[self._phase]:
            self._to(PeerPhase.MIGRATED_AWAY)
        self.migrated_away.set()

    def _taken_back(self) -> None:
        """The source took the VM back (device loop): this copy must stop."""
        assert self._loop is not None

        def here() -> None:
            if PeerPhase.TAKEN_BACK in PEER_TRANSITIONS[self._phase]:
                self._to(PeerPhase.TAKEN_BACK)
            self.taken_back.set()

        loops.call_soon(self._loop, here)

    async def _followed(self) -> None:
        """The VM runs here: clients of its stable address come here from now on, and
        its namespace's address lets them in (the network's side of the hand-over)."""
        await asyncio.to_thread(self.follow.running)

    async def _request_first(self, state: Device) -> None:
        """Ask for the state and what QEMU and the resumed VM touch first (device loop).

        QEMU reads the kernel and initramfs whole when it starts: they go at demand
        priority with the state. The hot chunks follow at prefetch priority, in the
        order the VM first touched them. Chunks that follow each other go as one
        request of at most FIRST_RUN chunks. The resume does not wait for the hot
        chunks: they keep arriving while QEMU loads the state, so the VM's first faults
        find them local or on their way, not one round trip each. Everything is in
        flight when this returns, so the background pull (started later) skips it.
        """
        assert self.sources is not None
        first = [self.devices["kernel"], self.devices["initramfs"], state]
        needed = [d.ensure_runs(list(range(d.chunks)), Priority.DEMAND, FIRST_RUN) for d in first]
        self._first = asyncio.ensure_future(asyncio.gather(*needed))
        requested = 0
        for name, device in self.devices.items():
            hot = [i for i in self.sources.of(name).hot.get(name, []) if not device.local[i]]
            if hot:
                prefetch = asyncio.ensure_future(
                    device.ensure_runs(hot, Priority.PREFETCH, FIRST_RUN)
                )
                prefetch.add_done_callback(_quiet)  # a failure shows in the pull too
                self._prefetches.append(prefetch)
                requested += len(hot)
        for _ in range(3):  # let every request be sent and registered as in flight
            await asyncio.sleep(0)
        log.debug("state, kernel, initramfs and %d hot chunk(s) requested", requested)

    async def _wait_first(self) -> None:
        assert self._first is not None
        await self._first

    async def _pull_all(self, pool: PullPool) -> None:
        """The background pull (device loop); after it, a registry is not needed."""
        assert self.sources is not None
        await pool.pull_all()
        self.summary.moved = {name: d.fetched_bytes for name, d in self.devices.items()}
        self.summary.wire_bytes = sum(s.stats.wire_bytes for s in self.sources.all)
        if self.sources.cache is not None:
            self.summary.cached = self.sources.cache.hit_bytes
        if self.incoming is None:  # every chunk is here: the registry is not needed
            await self.sources.close()

    async def _wait_until_missing_at_most(self, fraction: float) -> None:
        assert self._pull is not None
        while True:
            missing = self.progress.total - self.progress.done
            if missing <= fraction * self.progress.total:
                return
            if self._pull.done():
                self._pull.result()  # raises the pull's error
                return
            await asyncio.sleep(0.02)

    async def _tell_done(self, incoming: IncomingMigration) -> bool:
        """Once the VM runs here and every chunk is local, the source may stop."""
        assert self.host is not None and self.sources is not None
        if not await incoming.tell_done(self.wait_pulled):
            return False
        await self.host.run(self.sources.close())  # the source stops now
        return True

    async def take_back(self) -> str:
        """The operator's call on a source whose destination is away after switch-over:
        resume the VM here. Returns what was done and what it cost (lost writes)."""
        if self.serving is None:
            return "this peer does not serve its VM for migration: nothing to take back"
        return await self.serving.take_back()

    async def wait_done(self) -> bool:
        """After a migration to here: wait until the source was told it is done (every
        chunk is local here, the source stops); whether it could be told. True at once
        for a start from a registry."""
        if self._done is None:
            return True
        return await asyncio.shield(self._done)

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)

    async def wait_pulled(self) -> None:
        """Wait until every chunk is local; raises if pulling failed."""
        if self._pull is not None:
            await asyncio.shield(self._pull)

    def pull_failed(self) -> BaseException | None:
        """The error that ended the background pull, if it failed (else None)."""
        if self._pull is not None and self._pull.done() and not self._pull.cancelled():
            return self._pull.exception()
        return None

    # -- stop ------------------------------------------------------------------

    async def write_package(self, output: Path) -> None:
        """Snapshot the VM into a package ``drafter-runner`` can resume (VM stops)."""
        vm = self.vm
        if vm is None or vm.machine is None:
            raise DrafterError("the VM is not running")
        await self.wait_pulled()
        token = self.options.token
        key = index_key(token) if token else None
        await vm.write_package(output, lambda: vm.hot_ranges(self._hot_now()), key=key)

    async def close(self) -> None:
        """Stop the VM, unmount, drop the cache; safe to call more than once."""
        if self.checkpoints is not None:
            await self.checkpoints.stop(final=False)
        if self.hot is not None:
            self.hot.cancel()
        if self.serving is not None:
            self.serving.stop_takeover()
        if self._pull is not None:  # its failure, if any, was reported by whoever waited
            if self._pull.done():
                _ = self._pull.cancelled() or self._pull.exception()
            else:
                self._pull.cancel()
        if self.vm is not None:
            await self.vm.stop()
        if self.serving is not None:
            await self.serving.vm.settle()
        await asyncio.to_thread(self.follow.release)
        if self.serving is not None:
            await self.serving.close()
        if self.vm is not None:
            if self.sources is not None:
                for source in self.sources.all:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.vm.host.run(source.close()), 5)
            self.vm.close()
            self.vm = None
        self._to(PeerPhase.CLOSED)


def _quiet(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("prefetch failed: %s", future.exception())


def _remove_stale_peers(root: Path) -> None:
    """Work directories of peers that were killed: unmount and remove them."""
    for entry in root.glob("peer.*"):
        pid = entry.name.split(".")[1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            unmount_stale_under(entry)
            shutil.rmtree(entry, ignore_errors=True)
