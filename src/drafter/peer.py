"""A peer: start a VM from a remote package (registry) without downloading it first.

The peer learns the resources from the remote, fetches the small ``state`` whole,
then resumes the VM at once: ``memory``, ``disk``, ``kernel`` and ``initramfs`` are
devices whose chunks come on demand (the VM waits on a page fault or disk read)
while background workers pull the rest. Every write stays in the peer's own
copy-on-write cache; nothing goes back to the remote.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drafter import snapshot
from drafter.agent_client import AgentClient
from drafter.device import Device, Fetcher, Priority, RunFetcher
from drafter.devicefs import DeviceHost, unmount_stale_under
from drafter.errors import DrafterError
from drafter.migration import (
    TRACKED,
    MigrationDestination,
    MigrationSource,
    VMControl,
)
from drafter.network.follow import Follower
from drafter.network.state import DEFAULT_STATE_DIR
from drafter.package import (
    MAX_STATE_SIZE,
    PackageConfig,
    open_package,
)
from drafter.session import VMSession
from drafter.transport import protocol as wire
from drafter.transport import security
from drafter.transport.client import ChunkData, RemoteSource
from drafter.transport.hashes import file_hashes
from drafter.transport.server import ChunkServer
from drafter.vmm.qemu import QemuMachine

if TYPE_CHECKING:
    from drafter.metrics import Metrics

log = logging.getLogger(__name__)

# Pulled first: QEMU reads the kernel and initramfs whole when it starts.
PULL_ORDER = ("kernel", "initramfs", "memory", "disk")
PULL_RUN = 16  # consecutive chunks a background request asks for
WRITABLE = ("memory", "disk")
HOT_LIMIT = 128 << 20  # bytes of a device's hot set passed on to the next host


RESOURCES = ("state", *PULL_ORDER)


@dataclass
class PeerOptions:
    """How a :class:`Peer` starts: where the VM comes from (``raddr``: a registry, or a
    peer to migrate it from), the namespace it runs in, and how it pulls and serves."""

    raddr: str  # the server of every resource not named in raddrs
    netns: str | None
    token: str | None = None
    tls_ca: str | None = None
    # Most background requests (runs of up to PULL_RUN chunks) at once; the client's
    # window bounds the bytes in flight.
    pull_workers: int = 512
    compress: str = "auto"  # zstd unless the server is this host's loopback ("auto")
    # A package on this host: chunks whose hash matches are taken from it, not moved.
    local_package: Path | None = None
    # Seconds after the resume during which the chunks the VM reads are recorded as
    # its hot set (sent first to the next host).
    hot_window: float = 3.0
    # Resources that come from a server of their own (resource -> HOST:PORT).
    raddrs: dict[str, str] = field(default_factory=dict)
    # Fraction of the VM's bytes that may still be missing when the VM resumes:
    # 1 resumes at once (everything lazily), 0 waits until everything is local.
    resume_threshold: float = 1.0
    resume_timeout: float = 60.0
    retry_timeout: float = 30.0
    accel: str = "auto"
    work_root: Path = Path("out/vms")
    # Serve this VM here once it runs, so the next peer can migrate it ("" = don't).
    laddr: str = ""
    tls_cert: str | None = None
    tls_key: str | None = None
    # Pre-copy (migration from a peer): at most this many rounds of re-pulling dirtied
    # chunks; they end early once a round's dirty chunks total at most precopy_bytes.
    precopy_rounds: int = 5
    precopy_bytes: int = 8 << 20
    # After switch-over and before the hand-over, how long a source waits for a lost
    # destination to come back before it resumes the VM itself (None: never by itself;
    # after the hand-over only its operator can, with SIGUSR1).
    grace: float | None = 30.0
    # How long a destination asks for the hand-over (through reconnects) before it
    # gives the migration up and the source resumes the VM.
    handover_timeout: float = 15.0
    # A destination silent this long during pre-copy loses the migration (source side).
    offer_timeout: float = 30.0
    metrics: Metrics | None = None  # Prometheus metrics (drafter.metrics), if served
    # The daemon's state directory (the namespace's info, the handover records).
    state_dir: str = DEFAULT_STATE_DIR
    # A host address that follows this VM from namespace to namespace (docs/networking.md).
    stable_address: str | None = None


@dataclass
class MigrationSummary:
    """What one start or migration cost."""

    source: str = ""
    migrated: bool = False
    rounds: int = 0
    total_s: float = 0.0
    downtime_s: float = 0.0  # the VM paused at the source to running here (wall clocks)
    switch_s: float = 0.0  # switch-over asked to AfterResume done
    precopy_s: float = 0.0  # migration offered to switch-over asked
    moved: dict[str, int] = field(default_factory=dict)  # resource -> bytes fetched
    # Switch-over steps in order, both sides (BeforeSuspend ... first chunk served), ms.
    phases: dict[str, float] = field(default_factory=dict)
    reused: int = 0  # bytes taken from a local package instead of moved
    wire_bytes: int = 0  # chunk payload bytes that crossed the network (compressed)

    def line(self) -> str:
        """The summary as one line for a log or a terminal."""
        moved = ", ".join(f"{k} {v / (1 << 20):.1f} MiB" for k, v in self.moved.items())
        moved += f"; {self.wire_bytes / (1 << 20):.1f} MiB on the wire"
        if self.reused:
            moved += f", {self.reused / (1 << 20):.1f} MiB reused from a local package"
        if not self.migrated:
            return f"started from {self.source} in {self.total_s * 1000:.0f} ms; moved {moved}"
        return (
            f"migrated from {self.source}: total {self.total_s:.2f}s, downtime "
            f"{self.downtime_s * 1000:.0f} ms (switch-over to AfterResume "
            f"{self.switch_s * 1000:.0f} ms: {self.phase_line()}), {self.rounds} pre-copy "
            f"round(s), moved {moved}"
        )

    def phase_line(self) -> str:
        """The switch-over's steps and their milliseconds, in order."""
        return ", ".join(f"{name} {ms:.0f}" for name, ms in self.phases.items())


@dataclass
class PullProgress:
    """Bytes of the VM's resources local so far, of ``total``; ``finished`` (monotonic
    clock) once every chunk is here."""

    total: int = 0
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None


class Peer:
    """One VM started from a remote source: lazy start and migration on top of a
    :class:`drafter.session.VMSession` (devices that fetch from the remote). ``start``,
    then ``close``."""

    def __init__(self, options: PeerOptions) -> None:
        self.options = options
        self.vm: VMSession | None = None  # devices, mount, QEMU: the VM on this host
        self.remote: RemoteSource | None = None  # the memory's server (control calls)
        self.remotes: dict[str, RemoteSource] = {}  # resource -> its server
        self.sources: list[RemoteSource] = []  # one per distinct server
        self.config: PackageConfig | None = None
        self.progress = PullProgress()
        self.resume_seconds = 0.0
        self._pull: asyncio.Future[None] | None = None
        self.on_progress: Callable[[PullProgress], None] | None = None
        self.summary = MigrationSummary(source=options.raddr)
        self.server: ChunkServer | None = None
        self.migrated_away = asyncio.Event()
        # Set when the source took the VM back (it resumed it itself after losing us):
        # this copy must stop.
        self.taken_back = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.source: MigrationSource | None = None
        self._done: asyncio.Future[bool] | None = None
        self._paused_at = 0.0
        self.hot: dict[str, list[int]] = {}  # chunks the VM read after its resume
        self._prefetches: list[asyncio.Future[None]] = []
        self._first: asyncio.Future[list[None]] | None = None
        self._takeover: asyncio.Future[None] | None = None
        self.migration: MigrationDestination | None = None  # a migration to here
        self._grant: asyncio.Future[None] | None = None  # its hand-over (device loop)
        # Clients follow the VM: the gate of the namespace's address, the stable address.
        self.follow = Follower(options.netns, options.state_dir, options.stable_address)
        self._gate_closing: asyncio.Future[None] | None = None

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

    # -- start -----------------------------------------------------------------

    async def start(self) -> float:
        """Connect, resume the VM, call AfterResume; return seconds from start to resumed."""
        start = time.monotonic()
        self._loop = asyncio.get_running_loop()
        try:
            await self._start()
        except BaseException:
            metrics = self.options.metrics
            if metrics is not None and self.summary.migrated and self._done is None:
                metrics.destination_failed()  # after the resume, _done counts the outcome
            if self.migration is not None and self.host is not None:
                # Never ran here: the source resumes the VM at once, not after a timeout.
                with contextlib.suppress(Exception):
                    await self.host.run(self.migration.abort())
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
        # One connection per distinct server; each resource comes from the one named
        # for it (all five naming one server is the common case).
        addrs = {name: o.raddrs.get(name) or o.raddr for name in RESOURCES}
        sources = {
            addr: RemoteSource(
                addr,
                token=o.token,
                tls_ca=o.tls_ca,
                retry_timeout=o.retry_timeout,
                compress=o.compress,
            )
            for addr in dict.fromkeys(addrs.values())
        }
        self.sources = list(sources.values())
        if o.metrics is not None:
            for source in self.sources:
                o.metrics.attach_remote(source)
        await host.run(_connect_all(self.sources))
        remotes = self.remotes = {name: sources[addr] for name, addr in addrs.items()}
        remote = self.remote = remotes["memory"]  # control calls go to the memory's server
        if any(s.config != remote.config for s in self.sources):
            raise DrafterError("the servers given for the resources serve different VMs")
        self.config = PackageConfig.from_json(remote.config, addrs["memory"])
        # A running peer as the remote: a migration, whose source may hold the address.
        migrating = "state" not in remotes["memory"].manifest
        await asyncio.to_thread(self.follow.prepare, migrating)
        for name in PULL_ORDER:
            if name not in remotes[name].manifest:
                raise DrafterError(f"{addrs[name]} does not offer the {name} resource")
        manifest = {n: remotes[n].manifest[n] for n in RESOURCES if n in remotes[n].manifest}
        if "state" not in manifest and len(set(addrs[n] for n in PULL_ORDER)) > 1:
            raise DrafterError("a migration takes every resource from one peer: give one --raddr")
        if manifest["memory"] != self.config.memory_mib << 20:
            raise DrafterError(f"{addrs['memory']}: memory size differs from its config")
        if manifest.get("state", 0) > MAX_STATE_SIZE:
            raise DrafterError(f"{addrs['state']}: a state of {manifest['state']} bytes is absurd")

        def fetcher(resource: str) -> Fetcher:
            source = remotes[resource]

            async def fetch(
                index: int, priority: Priority, expected: bytes | None
            ) -> tuple[ChunkData, bytes]:
                return await source.fetch_chunk(resource, index, priority, expected)

            return fetch

        def run_fetcher(resource: str) -> RunFetcher:
            source = remotes[resource]

            async def fetch(
                start: int,
                count: int,
                expected: list[bytes | None],
                deliver: Callable[[int, ChunkData, bytes], None],
            ) -> None:
                await source.fetch_run(
                    resource, start, count, Priority.BACKGROUND, expected, deliver
                )

            return fetch

        for name in PULL_ORDER:
            self.devices[name] = Device(
                name,
                manifest[name],
                None,
                work / f"{name}.cache",
                writable=name in WRITABLE,
                chunk_size=remotes[name].chunk_size,
                fetcher=fetcher(name),
            )
            self.devices[name].run_fetcher = run_fetcher(name)
            at_rest = "state" in manifest  # a registry's package, not a running VM
            hashes = remotes[name].hashes[name]
            self.devices[name].expect(hashes, binding=at_rest or name not in TRACKED)
        if o.local_package is not None:
            await asyncio.to_thread(self._take_local_chunks, o.local_package)
        self.progress.total = sum(d.size for d in self.devices.values())
        machine = vm.mount(self.config, o.netns, o.accel)
        switched_at: float | None = None
        if "state" in manifest:  # a registry: the snapshot is at rest
            state = Device(
                "state",
                manifest["state"],
                None,
                work / "state",
                writable=False,
                chunk_size=remotes["state"].chunk_size,
                fetcher=fetcher("state"),
            )
            state.expect(remotes["state"].hashes["state"])
            # At once: the state with what QEMU reads when it starts, the hot chunks,
            # then the background pull (everything else overtakes it at the server);
            # QEMU starts meanwhile and waits for the state.
            await host.run(self._request_first(state))
            self._pull = asyncio.wrap_future(host.submit(self._pull_all()))
            await asyncio.gather(machine.prepare_incoming(), host.run(self._wait_first()))
            state.close()
        else:  # a running peer: migrate it here
            self.summary.migrated = True
            # QEMU starts now and waits for the state: its start is not downtime.
            await machine.prepare_incoming()
            switched_at = await host.run(self._precopy_and_switch(vm.state))
            self._pull = asyncio.wrap_future(host.submit(self._pull_all()))
        if o.resume_threshold < 1.0:
            await self._wait_until_missing_at_most(o.resume_threshold)
        self._record_hot()
        timings = snapshot.Timings()
        try:
            await asyncio.wait_for(
                vm.resume(timings, self._may_run(), self._followed),
                o.resume_timeout,
            )
        except TimeoutError:
            raise DrafterError(f"the VM did not resume within {o.resume_timeout:.0f}s") from None
        if switched_at is not None:
            self._summarise_switch_over(switched_at, timings)
            self._done = asyncio.ensure_future(self._tell_done())
            if o.metrics is not None:
                o.metrics.migrated_in(self.summary, self._done)
        if o.laddr:
            await self._serve(vm.mountpoint / "memory")

    def _record_hot(self) -> None:
        """Record what the VM reads in its first moments: the next host's hot set."""
        assert self.vm is not None
        vm = self.vm
        vm.start_recording()

        def stop() -> None:
            if self.vm is not vm:  # closed meanwhile
                return
            self.hot = self._hot_set(vm.stop_recording())
            log.debug("hot set: %s", {k: len(v) for k, v in self.hot.items()})

        asyncio.get_running_loop().call_later(self.options.hot_window, stop)

    def _hot_now(self) -> dict[str, list[int]]:
        """The hot set as far as it is known now (recorded whole, or so far)."""
        if self.hot or self.vm is None:
            return self.hot
        return self._hot_set(self.vm.recorded())

    def _hot_set(self, recorded: dict[str, list[int]]) -> dict[str, list[int]]:
        """The next host's hot set: the chunks this host put in the page cache before
        the VM ran here (the VM touched those without a FUSE read, so a recording does
        not see them), then the ones it read after; at most HOT_LIMIT bytes each."""
        cached = self.migration.cached if self.migration is not None else {}
        out = {}
        for name in ("memory", "disk"):
            chunks = dict.fromkeys(cached.get(name, {}))
            chunks.update(dict.fromkeys(recorded.get(name, [])))
            out[name] = list(chunks)[: max(1, HOT_LIMIT // self.devices[name].chunk_size)]
        return out

    async def _request_first(self, state: Device) -> None:
        """Ask for the state and what QEMU and the resumed VM touch first (device loop).

        QEMU reads the kernel and initramfs whole when it starts: they go at demand
        priority with the state. The hot chunks follow at prefetch priority, in the
        order the VM first touched them; the resume does not wait for them: they keep
        arriving while QEMU loads the state, so the VM's first faults find them local or
        on their way, not one round trip each. Everything is in flight when this
        returns, so the background pull started next skips it.
        """
        assert self.remote is not None
        first = [self.devices["kernel"], self.devices["initramfs"]]
        needed = [d.ensure(0, d.size, Priority.DEMAND) for d in first]
        needed.append(state.ensure(0, state.size, Priority.DEMAND))
        self._first = asyncio.ensure_future(asyncio.gather(*needed))
        requested = 0
        for name, device in self.devices.items():
            for index in self.remotes[name].hot.get(name, []):
                if not device.local[index]:
                    prefetch = asyncio.ensure_future(device.ensure_chunk(index, Priority.PREFETCH))
                    prefetch.add_done_callback(_quiet)  # a failure shows in the pull too
                    self._prefetches.append(prefetch)
                    requested += 1
        for _ in range(3):  # let every request be sent and registered as in flight
            await asyncio.sleep(0)
        log.debug("state, kernel, initramfs and %d hot chunk(s) requested", requested)

    async def _wait_first(self) -> None:
        assert self._first is not None
        await self._first

    def _take_local_chunks(self, path: Path) -> None:
        """Chunks of a local package whose hashes match the remote's: copied, not moved."""
        package = open_package(path)
        taken = 0
        fd = os.open(package.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for name, device in self.devices.items():
                member = package.members.get(name)
                if member is None or member.size != device.size:
                    continue
                local = file_hashes(fd, member.offset, member.size, device.chunk_size)
                for index, (mine, theirs) in enumerate(zip(local, device.hashes, strict=True)):
                    if mine == theirs and mine != wire.ZERO_HASH and not device.local[index]:
                        start = index * device.chunk_size
                        length = min(device.chunk_size, device.size - start)
                        device.fill(index, os.pread(fd, length, member.offset + start), mine)
                        taken += length
        finally:
            os.close(fd)
        self.summary.reused = taken
        log.info("took %d MiB from %s instead of moving them", taken >> 20, path)

    async def _precopy_and_switch(self, state_file: Path) -> float:
        """Pre-copy rounds then switch-over (device loop); returns when it was asked.
        The hand-over is asked at once, while QEMU loads the state."""
        assert self.remote is not None and self.host is not None
        o = self.options
        loop = self._loop
        migration = self.migration = MigrationDestination(
            self.remote,
            self.devices,
            self._pull_missing,
            self.host,
            rounds=o.precopy_rounds,
            precopy_bytes=o.precopy_bytes,
            retry_timeout=o.retry_timeout,
            handover_timeout=o.handover_timeout,
        )
        if loop is not None:

            def taken_back() -> None:
                loop.call_soon_threadsafe(self.taken_back.set)

            migration.on_taken_back = taken_back
        offered = time.monotonic()
        await migration.precopy()
        self.summary.rounds = migration.rounds_done
        switched_at = time.monotonic()
        self.summary.precopy_s = switched_at - offered
        answer = await migration.switch_over()
        self._paused_at = answer.paused_at
        self._grant = asyncio.ensure_future(migration.hand_over())
        self._grant.add_done_callback(_quiet)  # awaited by _may_run, or the start failed
        await asyncio.to_thread(state_file.write_bytes, answer.state)
        return switched_at

    def _may_run(self) -> Callable[[], Coroutine[Any, Any, None]] | None:
        """For a migration: what the resume awaits between the load and the run (the
        hand-over; then the VM is ours). None for a start from a registry."""
        migration, host = self.migration, self.host
        if migration is None or host is None:
            return None

        async def granted() -> None:
            async def wait() -> None:
                assert self._grant is not None
                await self._grant

            await host.run(wait())
            migration.told_to_run = True
            for device in self.devices.values():
                device.first_demand_at = None

        return granted

    async def _followed(self) -> None:
        """The VM runs here: clients of its stable address come here from now on, and
        its namespace's address lets them in (the network's side of the hand-over)."""
        await asyncio.to_thread(self.follow.running)

    def _summarise_switch_over(self, switched_at: float, timings: snapshot.Timings) -> None:
        assert self.migration is not None
        resumed = time.monotonic()
        self.summary.downtime_s = max(0.0, timings.resumed_at - self._paused_at)
        self.summary.switch_s = resumed - switched_at
        phases = self.summary.phases
        phases.update(self.migration.phases)
        phases["load"] = timings.load * 1000
        phases["hand-over granted after"] = timings.granted * 1000
        phases["resume"] = timings.cont * 1000
        phases["AfterResume"] = timings.after_resume * 1000
        resumed_at = resumed - timings.after_resume
        served = [d.first_demand_at for d in self.devices.values() if d.first_demand_at]
        if served:
            phases["first chunk served"] = max(0.0, min(served) - resumed_at) * 1000
        log.info("switch-over phases (ms): %s", self.summary.phase_line())

    def _runs(self) -> asyncio.Queue[tuple[Device, int, int]]:
        """Every missing chunk, as runs of consecutive chunks, in PULL_ORDER."""
        queue: asyncio.Queue[tuple[Device, int, int]] = asyncio.Queue()
        for name in PULL_ORDER:
            device = self.devices[name]
            start = count = 0
            for index in device.missing():
                if count and index == start + count and count < PULL_RUN:
                    count += 1
                    continue
                if count:
                    queue.put_nowait((device, start, count))
                start, count = index, 1
            if count:
                queue.put_nowait((device, start, count))
        return queue

    async def _pull_missing(self) -> None:
        """Fetch every missing chunk now, with the pull workers (device loop)."""
        queue = self._runs()

        async def worker() -> None:
            while not queue.empty():
                device, start, count = queue.get_nowait()
                await device.pull_run(start, count)

        workers = min(queue.qsize(), max(1, self.options.pull_workers))
        await asyncio.gather(*(worker() for _ in range(workers)))

    async def _serve(self, memory_file: Path) -> None:
        """Serve this VM on ``laddr`` so another peer can migrate it away."""
        assert self.vm is not None and self.remote is not None and self.machine is not None
        o = self.options
        loop = asyncio.get_running_loop()
        vm, machine = self.vm, self.machine

        def close_gate() -> None:
            """Paused: resets at this namespace's address, and the host's connections
            there cut, beside the state save (off the switch-over's critical path)."""
            self._gate_closing = asyncio.ensure_future(asyncio.to_thread(self.follow.left))
            self._gate_closing.add_done_callback(_logged("closing the gate"))

        async def reopen_gate() -> None:
            if self._gate_closing is not None:
                await asyncio.wait([self._gate_closing])
            await asyncio.to_thread(self.follow.running)  # it runs here again

        async def suspend() -> tuple[bytes, float, dict[str, float]]:
            timings = snapshot.Timings()
            try:
                await vm.suspend(timings, presync=True, paused=close_gate)
                phases = {
                    "BeforeSuspend": timings.before_suspend * 1000,  # and a memory sync
                    "pause": timings.pause * 1000,
                    "state save": timings.save * 1000,
                    "memory sync": timings.sync * 1000,
                }
                return vm.state.read_bytes(), timings.paused_at, phases
            except BaseException as e:
                # Whatever step failed, the VM runs here again, AfterResume included.
                try:
                    if timings.paused_at:
                        await machine.resume()
                        await reopen_gate()
                    async with AgentClient(machine.agent_socket) as agent:
                        await agent.after_resume()
                except Exception as again:
                    log.error("could not resume the VM here after that: %s", again)
                else:
                    log.warning("switch-over failed (%s): the VM runs here again "
                                "(resumed, AfterResume done)", e)  # fmt: skip
                raise

        async def resume_here() -> None:
            await machine.resume()
            await reopen_gate()
            async with AgentClient(machine.agent_socket) as agent:
                await agent.after_resume()

        control = VMControl(loop, suspend, resume_here, self.migrated_away.set)
        self.source = MigrationSource(self.devices, self.remote.config, memory_file, control,
                                      grace=o.grace, offer_timeout=o.offer_timeout)  # fmt: skip
        # Asked at each connection: a migration may start before the recording ends.
        self.source.hot_chunks = self._hot_now
        server = ChunkServer(self.source)
        if o.metrics is not None:
            o.metrics.attach_source(self.source)
            o.metrics.attach_server(server)
        host, port = wire.parse_addr(o.laddr, "--laddr")
        ssl = security.tls_server_options(o.tls_cert, o.tls_key)
        start = functools.partial(server.start, host or None, port, ssl=ssl, token=o.token)
        try:
            await vm.host.run(start())
        except OSError as e:
            if e.errno != errno.EADDRINUSE or not self.summary.migrated:
                raise DrafterError(f"cannot serve on {o.laddr}: {e.strerror or e}") from None
            # The source we migrated from still serves there (the seed's chain on one
            # host): take the address over once it has left.
            log.info("%s is still the source's; serving there once it has left", o.laddr)
            self._takeover = asyncio.ensure_future(self._serve_when_free(server, start))
            return
        self.server = server
        log.info("serving this VM for migration on %s", ", ".join(server.addresses))

    async def _serve_when_free(
        self, server: ChunkServer, start: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        assert self.host is not None
        deadline = time.monotonic() + max(60.0, (self.options.grace or 0.0) * 2)
        while True:
            await asyncio.sleep(0.2)
            try:
                await self.host.run(start())
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    log.error("cannot serve on %s: %s", self.options.laddr, e.strerror or e)
                    return
                continue
            self.server = server
            log.info("serving this VM for migration on %s", ", ".join(server.addresses))
            return

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

    async def _pull_all(self) -> None:
        """Background workers: every missing chunk, in PULL_ORDER (runs on the device loop)."""
        for name in PULL_ORDER:
            device = self.devices[name]
            self.progress.done += device.size - device.missing_bytes()
        queue = self._runs()
        self._report()

        async def worker() -> None:
            while True:
                try:
                    device, start, count = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await device.pull_run(start, count)
                end = min((start + count) * device.chunk_size, device.size)
                self.progress.done += end - start * device.chunk_size
                self._report()

        for _ in range(10):  # a chunk fetched elsewhere may have failed: pull it again
            count = min(queue.qsize(), max(1, self.options.pull_workers))
            workers = [asyncio.ensure_future(worker()) for _ in range(count)]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
            for device in self.devices.values():
                await device.settle()  # demand and prefetch fetches still on their way
            queue = self._runs()
            if queue.empty():
                break
        else:
            raise DrafterError("chunks stay missing after pulling them ten times")
        self.progress.done = self.progress.total
        self.progress.finished = time.monotonic()
        self.summary.moved = {name: d.fetched_bytes for name, d in self.devices.items()}
        self.summary.wire_bytes = sum(s.stats.wire_bytes for s in self.sources)
        self._report()
        if not self.summary.migrated:  # every chunk is here: the registry is not needed
            await _close_all(self.sources)

    async def _tell_done(self) -> bool:
        """Once the VM runs here and every chunk is local, the source may stop."""
        assert self.host is not None and self.migration is not None
        try:
            await self.wait_pulled()
        except Exception as e:
            log.error("the migration cannot finish: %s", e)
            return False
        if not await self.host.run(self.migration.finish()):
            return False
        await self.host.run(_close_all(self.sources))  # the source stops now
        return True

    async def take_back(self) -> str:
        """The operator's call on a source whose destination is away after switch-over:
        resume the VM here. Returns what was done and what it cost (lost writes)."""
        if self.source is None or self.host is None:
            return "this peer does not serve its VM for migration: nothing to take back"
        return await self.host.run(self.source.take_back())

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
        await vm.write_package(output, lambda: vm.hot_ranges(self._hot_now()))

    async def close(self) -> None:
        """Stop the VM, unmount, drop the cache; safe to call more than once."""
        if self._takeover is not None:
            self._takeover.cancel()
        if self._pull is not None:  # its failure, if any, was reported by whoever waited
            if self._pull.done():
                _ = self._pull.cancelled() or self._pull.exception()
            else:
                self._pull.cancel()
        if self.vm is not None:
            await self.vm.stop()
        if self._gate_closing is not None:
            await asyncio.wait([self._gate_closing])
        await asyncio.to_thread(self.follow.release)
        if self.host is not None and self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.host.run(self.server.close()), 5)
            self.server = None
        if self.vm is not None:
            for source in self.sources:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.vm.host.run(source.close()), 5)
            self.vm.close()
            self.vm = None


async def _connect_all(sources: list[RemoteSource]) -> None:
    await asyncio.gather(*(s.connect() for s in sources))


async def _close_all(sources: list[RemoteSource]) -> None:
    await asyncio.gather(*(s.close() for s in sources))


def _logged(what: str) -> Callable[[asyncio.Future[None]], None]:
    def report(future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.warning("%s failed: %s", what, future.exception())

    return report


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
