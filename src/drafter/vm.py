"""Package a blueprint, resume a package, suspend it back: the library behind the commands.

    async with await package_blueprint(...)   # boot, liveness, snapshot, write .drft
    async with LocalVM(package_path, netns) as vm:   # resume from a package
        ...
        await vm.suspend_and_flush()           # snapshot back into the package

Work files live in a private directory next to the package (same file system, so
the final rename is atomic); it is removed whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from drafter import snapshot
from drafter.blueprint.builder import Blueprint
from drafter.chunks import DEVICES, TRACKED
from drafter.device import Device
from drafter.devicefs import unmount_stale_under
from drafter.errors import DrafterError
from drafter.package import (
    HotRanges,
    Package,
    PackageConfig,
    PackageWriteError,
    copy_file_sparse,
    open_package,
    write_package,
)
from drafter.session import HotSet, VMSession
from drafter.vmm.base import DEFAULT_BOOT_ARGS, DEFAULT_MAC, MachineConfig, check_host
from drafter.vmm.qemu import QemuMachine

log = logging.getLogger(__name__)


@dataclass
class VMShape:
    """The VM :func:`package_blueprint` boots: memory (MiB), vCPUs, kernel command
    line, MAC address of its network device, and the accelerator (auto, kvm or tcg)."""

    memory_mib: int = 512
    cpus: int = 1
    boot_args: str = DEFAULT_BOOT_ARGS
    mac: str = DEFAULT_MAC
    accel: str = "auto"


def _workdir(near: Path) -> Path:
    """A private work directory beside ``near``; stale ones of dead processes go first."""
    parent = Path(near).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, Path(near).name)
    prefix = f".{Path(near).name}.{os.getpid()}."
    return Path(tempfile.mkdtemp(prefix=prefix, suffix=".work", dir=parent))


def remove_stale(parent: Path, name: str) -> None:
    """Remove work directories and temporary packages left by killed processes."""
    for entry in parent.glob(f".{name}.*"):
        parts = entry.name[len(name) + 2 :].split(".")
        if not parts or not parts[0].isdigit() or not entry.name.endswith((".work", ".tmp")):
            continue
        pid = int(parts[0])
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            log.debug("removing %s left by dead process %d", entry, pid)
            if entry.is_dir():
                unmount_stale_under(entry)
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


async def package_blueprint(
    blueprint: Blueprint,
    output: Path,
    netns: str | None,
    shape: VMShape,
    liveness_timeout: float = 300.0,
    hot_window: float = 2.0,
    key: bytes | None = None,
) -> snapshot.Timings:
    """Boot ``blueprint``, wait for liveness, snapshot, write the package ``output``.

    With ``hot_window`` > 0 the package is then resumed once for that many seconds to
    record the chunks a resumed VM touches first (its hot set), and snapshotted again
    with that record, so a peer can fetch them before the resume, all at once. The
    package's index is sealed with ``key`` (a token's) when given.
    """
    for what, path in (("kernel", blueprint.kernel), ("initramfs", blueprint.initramfs),
                       ("disk", blueprint.disk)):  # fmt: skip
        if not Path(path).is_file():
            raise DrafterError(f"{what} {path} does not exist (run drafter-blueprint)")
    pkg_config = PackageConfig(shape.memory_mib, shape.cpus, shape.boot_args, shape.mac)
    check_host(shape.memory_mib, shape.cpus)
    work = _workdir(output)
    timings = snapshot.Timings()
    try:
        disk = work / "disk"
        copy_file_sparse(Path(blueprint.disk), disk)  # the blueprint stays pristine
        config = MachineConfig(
            kernel=blueprint.kernel,
            initramfs=blueprint.initramfs,
            disk=disk,
            memory=work / "memory",
            memory_mib=shape.memory_mib,
            cpus=shape.cpus,
            boot_args=shape.boot_args,
            netns=netns,
            mac=shape.mac,
            accel=shape.accel,
        )
        machine = QemuMachine(config, work / "run")
        try:
            timings.boot_to_liveness = await snapshot.boot_to_liveness(machine, liveness_timeout)
            await snapshot.suspend(machine, work / "state", timings)
        finally:
            await machine.stop()
        write_package(
            output,
            pkg_config,
            {
                "state": work / "state",
                "memory": work / "memory",
                "kernel": Path(blueprint.kernel),
                "initramfs": Path(blueprint.initramfs),
                "disk": disk,
            },
            key=key,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if hot_window > 0:
        trial = LocalVM(output, netns, accel=shape.accel, hot_window=hot_window, key=key)
        async with trial as vm:
            await asyncio.sleep(hot_window)
            await vm.suspend_and_flush()
    return timings


class FlushFailed(DrafterError):
    """A suspended VM could not be written to its package; nothing is lost yet."""

    def __init__(self, target: Path, reason: str, kept: int) -> None:
        super().__init__(
            f"could not write {target}: {reason}. Nothing is lost yet: the VM is "
            f"suspended and its state and {kept / (1 << 20):.0f} MiB of chunks changed "
            "since its resume are kept until this process exits"
        )
        self.target = target
        self.reason = reason
        self.kept = kept


@dataclass
class LocalVM:
    """A VM resumed from a local package; ``suspend_and_flush`` writes it back.

    The package is not copied: each resource becomes a copy-on-write device over its
    member (see :mod:`drafter.device`) served to QEMU through FUSE, so resume time
    does not depend on the package size and the package is never written in place.
    A flush composes a new package from the members and the changed chunks and
    renames it over the old one. The devices, mount and QEMU are a
    :class:`drafter.session.VMSession`.
    """

    package_path: Path
    netns: str | None
    persist: bool = True
    accel: str = "auto"
    # Seconds after the resume during which reads are recorded as the hot set that
    # the next flush stores in the package (0: keep the package's hot set).
    hot_window: float = 3.0
    key: bytes | None = None  # a token's: seals the index of the packages it writes
    # Where a flush writes the package (None: back to package_path).
    output: Path | None = None
    timings: snapshot.Timings = field(default_factory=snapshot.Timings)
    package: Package | None = None
    session: VMSession | None = None
    suspended: bool = False  # its QEMU stopped, its state saved: only writes remain
    _hot: HotSet | None = None

    @property
    def machine(self) -> QemuMachine | None:
        """The VM's QEMU while it runs (its session's)."""
        return self.session.machine if self.session is not None else None

    async def __aenter__(self) -> LocalVM:
        await self.resume()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def resume(self) -> None:
        """Resume the VM from the package and call AfterResume."""
        start = time.monotonic()
        pkg = open_package(self.package_path)
        check_host(pkg.config.memory_mib, pkg.config.cpus)
        self.package = pkg
        session = self.session = VMSession(_workdir(self.package_path))
        try:
            pkg.copy_to_file("state", session.state)
            for r in DEVICES:
                session.devices[r] = Device(r, pkg.members[r].size, pkg.range(r),
                                            session.work / f"{r}.overlay",
                                            writable=r in TRACKED)  # fmt: skip
            session.mount(pkg.config, self.netns, self.accel)
            if self.hot_window > 0:
                self._hot = HotSet(session, self.hot_window)
                self._hot.start(arm=False)  # the window starts once the VM runs
            await session.resume(self.timings)
            if self._hot is not None:
                self._hot.arm()
        except BaseException:
            await self.close()
            raise
        log.info("resumed %s in %.2fs", self.package_path, time.monotonic() - start)

    def hot(self) -> HotRanges:
        """What the next flush stores as the hot set (the package's, if none recorded)."""
        recorded: dict[str, list[int]] = {}
        if self._hot is not None:
            self._hot.stop()
            recorded = {name: c for name, c in self._hot.now().items() if c}
        if not recorded or self.session is None:
            return self.package.hot if self.package is not None else {}
        return self.session.hot_ranges(recorded)

    async def suspend_and_flush(self) -> float:
        """BeforeSuspend, snapshot, and (with persist) replace the package atomically."""
        session = self.session
        if session is None or session.machine is None or self.package is None:
            raise DrafterError("the VM is not running")
        start = time.monotonic()
        await session.suspend(self.timings)
        await session.stop()
        self.suspended = True
        if self.persist:
            await self.write_back()
        return time.monotonic() - start

    async def write_back(self) -> None:
        """Write the suspended VM to its package (after :meth:`suspend_and_flush`
        stopped it). FlushFailed if it cannot: nothing is lost then (the VM's state
        and devices stay here until :meth:`close`) and it may be called again."""
        session = self.session
        if session is None or not self.suspended:
            raise DrafterError("the VM is not suspended")
        target = self.output or self.package_path
        start = time.monotonic()
        try:
            await session.write_stopped(target, self.hot, self.key)
        except PackageWriteError as e:
            raise FlushFailed(target, e.reason, self.changed_bytes()) from None
        except OSError as e:
            raise FlushFailed(target, e.strerror or str(e), self.changed_bytes()) from None
        log.info("flushed the snapshot to %s in %.2fs", target, time.monotonic() - start)

    def changed_bytes(self) -> int:
        """Bytes of the chunks the VM changed since its resume (what a flush keeps)."""
        if self.session is None:
            return 0
        return sum(
            device.chunk_length(index)
            for device in self.session.devices.values()
            for index, here in enumerate(device.local)
            if here
        )

    async def close(self) -> None:
        """Stop the VM (without saving), unmount, and remove the work files."""
        if self._hot is not None:
            self._hot.cancel()
        if self.session is not None:
            await self.session.stop()
            self.session.close()
            self.session = None
