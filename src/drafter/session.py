"""One VM on this host, whatever it started from: the session every role shares.

A session holds the VM's devices, serves them to QEMU as files through FUSE (on the
device loop of a :class:`drafter.devicefs.DeviceHost`), runs QEMU, and takes the VM
through its steps: resume, suspend, write back into a package, close. The runner
resumes one from a local package (:class:`drafter.vm.LocalVM`); a peer starts one
from a remote source, lazily, and migrates it (:class:`drafter.peer.Peer`), on top of
the same session.

    session = VMSession(work)
    session.devices["memory"] = Device(...)  # every resource, before the mount
    session.mount(config, netns, accel)
    await session.resume()                   # the state file is work / "state"
    ...
    await session.write_package(output, hot)  # suspend, stop, write
    await session.stop(); session.close()
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from drafter import snapshot
from drafter.chunks import TRACKED
from drafter.device import Device
from drafter.devicefs import DeviceHost
from drafter.errors import DrafterError
from drafter.package import HotRanges, PackageConfig, Source, hot_ranges, write_package
from drafter.vmm.qemu import QemuMachine


class VMSession:
    """Devices, their mount, QEMU and the VM's lifecycle, in the work directory ``work``
    (removed by :meth:`close`)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.host = DeviceHost()  # its device loop: FUSE, and what else touches devices
        self.devices: dict[str, Device] = {}
        self.config: PackageConfig | None = None
        self.machine: QemuMachine | None = None

    @property
    def state(self) -> Path:
        """The VMM state file: what a resume loads and a suspend saves."""
        return self.work / "state"

    @property
    def mountpoint(self) -> Path:
        """Where the devices are served as files (QEMU's paths)."""
        return self.work / "devices"

    def mount(self, config: PackageConfig, netns: str | None, accel: str) -> QemuMachine:
        """Serve the devices as files and make the VM's QEMU (not started yet)."""
        self.host.mount(list(self.devices.values()), self.mountpoint)
        self.config = config
        self.machine = QemuMachine(config.machine(self.mountpoint, netns, accel), self.work / "run")
        return self.machine

    def _machine(self) -> QemuMachine:
        if self.machine is None:
            raise DrafterError("the VM is not running")
        return self.machine

    # -- the hot set ------------------------------------------------------------------

    def start_recording(self) -> None:
        """Record the chunks the VM reads from now on, in first-read order."""
        for name in TRACKED:
            self.devices[name].recording = {}

    def recorded(self) -> dict[str, list[int]]:
        """The chunks recorded so far (recording goes on)."""
        return {name: self.devices[name].recorded() for name in TRACKED}

    def stop_recording(self) -> dict[str, list[int]]:
        """Stop recording; the chunks recorded, per device."""
        return {name: self.devices[name].stop_recording() for name in TRACKED}

    def hot_ranges(self, chunks: dict[str, list[int]]) -> HotRanges:
        """A hot set (device -> chunks) as a package stores it."""
        sizes = {name: d.size for name, d in self.devices.items()}
        return hot_ranges(chunks, self.devices["memory"].chunk_size, sizes)

    # -- the lifecycle ------------------------------------------------------------------

    async def resume(
        self,
        timings: snapshot.Timings | None = None,
        granted: Callable[[], Awaitable[None]] | None = None,
        running: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Load the state, resume, AfterResume (see :func:`drafter.snapshot.resume`)."""
        await snapshot.resume(self._machine(), self.state, timings, granted, running)

    async def suspend(
        self,
        timings: snapshot.Timings | None = None,
        presync: bool = False,
        paused: Callable[[], None] | None = None,
    ) -> None:
        """BeforeSuspend, pause, save the state, sync memory (:func:`snapshot.suspend`)."""
        await snapshot.suspend(self._machine(), self.state, timings, presync, paused)

    async def write_package(
        self,
        output: Path,
        hot: Callable[[], HotRanges],
        timings: snapshot.Timings | None = None,
        key: bytes | None = None,
    ) -> None:
        """Suspend, stop QEMU, and write the VM to the package ``output`` (atomically,
        with the hot set ``hot`` gives once the VM stopped; its index sealed with
        ``key``, a token's, when given)."""
        if self.config is None:
            raise DrafterError("the VM is not running")
        await self.suspend(timings)
        await self.stop()
        await self.write_stopped(output, hot, key)

    async def write_stopped(
        self, output: Path, hot: Callable[[], HotRanges], key: bytes | None = None
    ) -> None:
        """Write the VM, suspended and its QEMU stopped, to the package ``output``
        (atomically); may be called again after it failed (nothing was changed)."""
        if self.config is None:
            raise DrafterError("the VM is not running")
        sources: dict[str, Source | Path] = {"state": self.state, **self.devices}
        await asyncio.to_thread(write_package, output, self.config, sources, hot(), key)

    async def stop(self) -> None:
        """Stop QEMU (without saving); the devices stay served."""
        if self.machine is not None:
            await self.machine.stop()

    def close(self) -> None:
        """Unmount, stop the device loop, close the devices, remove the work directory;
        after :meth:`stop`, and after whatever else runs on the device loop ended.
        Safe to call more than once."""
        self.host.close()
        for device in self.devices.values():
            device.close()
        shutil.rmtree(self.work, ignore_errors=True)


class HotSet:
    """What a resumed VM reads in its first ``window`` seconds, in first-read order, per
    tracked device: what the next host fetches first, or the next package stores.

    ``first`` gives chunks to put ahead of the recording (those a migration stored
    into the page cache before the VM ran here: the VM touched them without a FUSE
    read, so a recording does not see them); ``limit`` caps each device's bytes.
    Started and stopped on the main loop; :meth:`now` may be asked from any thread
    (a migration source asks it on the device loop at each connection).
    """

    def __init__(
        self,
        session: VMSession,
        window: float,
        first: Callable[[], dict[str, dict[int, None]]] | None = None,
        limit: int | None = None,
    ) -> None:
        self.session = session
        self.window = window
        self.first = first
        self.limit = limit
        self.chunks: dict[str, list[int]] | None = None  # once the window ended
        self._recording = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self, arm: bool = True) -> None:
        """Record from now on; with ``arm`` the window starts now too (else at
        :meth:`arm`, for example once the VM resumed)."""
        self.session.start_recording()
        self._recording = True
        if arm:
            self.arm()

    def arm(self) -> None:
        """Start the window: the recording ends ``window`` seconds from now."""
        if self._recording and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window, self.stop)

    def stop(self) -> None:
        """End the recording now (nothing once ended, or once cancelled)."""
        if self.chunks is None and self._recording:
            if self._timer is not None:
                self._timer.cancel()
            self._recording = False
            self.chunks = self._shape(self.session.stop_recording())

    def now(self) -> dict[str, list[int]]:
        """The hot set as far as it is known now (recorded whole, or so far)."""
        if self.chunks is not None:
            return self.chunks
        if not self._recording:
            return {}
        return self._shape(self.session.recorded())

    def cancel(self) -> None:
        """The VM is going away: the timer does nothing any more."""
        self._recording = False
        if self._timer is not None:
            self._timer.cancel()

    def _shape(self, recorded: dict[str, list[int]]) -> dict[str, list[int]]:
        first = self.first() if self.first is not None else {}
        out = {}
        for name in TRACKED:
            chunks = dict.fromkeys(first.get(name, {}))
            chunks.update(dict.fromkeys(recorded.get(name, [])))
            hot = list(chunks)
            if self.limit is not None:
                hot = hot[: max(1, self.limit // self.session.devices[name].chunk_size)]
            out[name] = hot
        return out
