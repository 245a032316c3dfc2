"""QEMU ``microvm`` driven over QMP with QEMU's own client (``qemu.qmp``).

Guest RAM is a file mapped shared (``memory-backend-file,share=on``), so snapshots
save only device state (migration capability ``x-ignore-shared``) and a restore maps
the same memory file in a new QEMU process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import shlex
import shutil
import signal
from pathlib import Path

from qemu.qmp import QMPClient, QMPError

from drafter.errors import DrafterError
from drafter.vmm import accel
from drafter.vmm.base import MachineConfig, check_host, check_shape

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
AGENT_PORT = "drafter.agent"
LIVENESS_PORT = "drafter.liveness"
PR_SET_PDEATHSIG = 1
_TAP = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # a Linux interface name, no option syntax


def _opt(value: object) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas doubled, so a path with a
    comma cannot add options of its own."""
    return str(value).replace(",", ",,")


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL if the process that started QEMU dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise DrafterError(f"{QEMU} is not installed (run scripts/install-deps)")
    return path


class QemuMachine:
    """One QEMU process running one VM; ``run_dir`` holds its sockets and logs."""

    def __init__(self, config: MachineConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.qmp_socket = run_dir / "qmp.sock"
        self.agent_socket = run_dir / "agent.sock"
        self.liveness_socket = run_dir / "liveness.sock"
        self.console_socket = run_dir / "console.sock"
        self.console_log = run_dir / "console.log"
        self.qemu_log = run_dir / "qemu.log"
        self.process: asyncio.subprocess.Process | None = None
        self.qmp: QMPClient | None = None

    # -- lifecycle -------------------------------------------------------------

    def _check(self) -> None:
        qemu_binary()
        c = self.config
        for what, path in (("kernel", c.kernel), ("initramfs", c.initramfs), ("disk", c.disk)):
            if not Path(path).is_file():
                raise DrafterError(f"{what} {path} does not exist")
        try:
            check_shape(c.memory_mib, c.cpus, c.boot_args, c.mac)
        except ValueError as e:
            raise DrafterError(f"bad VM shape: {e}") from None
        check_host(c.memory_mib, c.cpus)
        if not _TAP.fullmatch(c.tap):
            raise DrafterError(f"bad tap device name {c.tap!r}")

    def command(self, incoming: bool = False) -> list[str]:
        """The QEMU command line for this machine."""
        c = self.config
        acc = accel.choose(c.accel)
        mem = f"{c.memory_mib}M"
        cmd = [
            qemu_binary(),
            "-name", "drafter",
            "-M", f"microvm,accel={acc},pit=on,pic=on,rtc=on,memory-backend=mem",
            "-cpu", "host" if acc == "kvm" else "max",
            "-smp", str(c.cpus),
            "-m", mem,
            "-object", f"memory-backend-file,id=mem,size={mem},mem-path={_opt(c.memory)},share=on",
            "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
            "-kernel", str(c.kernel),
            "-initrd", str(c.initramfs),
            "-append", c.boot_args,
            "-chardev", f"socket,id=console,path={_opt(self.console_socket)},server=on,wait=off,"
            f"logfile={_opt(self.console_log)},logappend=on",
            "-serial", "chardev:console",
            "-drive", f"id=disk,file={_opt(c.disk)},format=raw,if=none,cache=writeback",
            "-device", "virtio-blk-device,drive=disk",
            "-device", "virtio-serial-device,max_ports=4",
            "-chardev", f"socket,id=agent,path={_opt(self.agent_socket)},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
            "-chardev", f"socket,id=liveness,path={_opt(self.liveness_socket)},server=on,wait=off",
            "-device", f"virtserialport,chardev=liveness,name={LIVENESS_PORT}",
            "-object", "rng-random,id=rng,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=rng",
            "-qmp", f"unix:{_opt(self.qmp_socket)},server=on,wait=off",
            "-S",
        ]  # fmt: skip
        if c.netns:
            cmd += [
                "-netdev", f"tap,id=net,ifname={c.tap},script=no,downscript=no",
                "-device", f"virtio-net-device,netdev=net,mac={c.mac}",
            ]  # fmt: skip
            cmd = ["ip", "netns", "exec", c.netns, *cmd]
        if incoming:
            cmd += ["-incoming", "defer"]
        return cmd

    async def _start(self, incoming: bool) -> None:
        self._check()
        if self.config.netns and not Path(f"/run/netns/{self.config.netns}").exists():
            raise DrafterError(
                f"network namespace {self.config.netns} does not exist (start drafter-daemon)"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        memory = Path(self.config.memory)
        size = self.config.memory_mib << 20
        if not memory.exists():
            with memory.open("wb") as f:
                f.truncate(size)
        elif memory.stat().st_size != size:
            raise DrafterError(
                f"memory file {memory} holds {memory.stat().st_size >> 20} MiB, "
                f"the VM is configured for {self.config.memory_mib} MiB"
            )
        cmd = self.command(incoming)
        log.debug("starting %s", shlex.join(cmd))
        with self.qemu_log.open("ab") as err:
            self.process = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                # No orphaned VMs: QEMU dies with us, even on SIGKILL.
                preexec_fn=_die_with_parent,
            )
        log.debug("QEMU pid %d", self.process.pid)
        try:
            await self._connect_qmp()
        except BaseException:
            await self.stop()
            raise

    async def _connect_qmp(self, timeout: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await self.check_alive()
            if self.qmp_socket.exists():
                qmp = QMPClient("drafter")
                try:
                    # The socket file appears at bind(), a moment before listen().
                    await qmp.connect(str(self.qmp_socket))
                    self.qmp = qmp
                    return
                except (QMPError, OSError):
                    pass
            if loop.time() > deadline:
                raise DrafterError("QEMU did not open its QMP socket")
            await asyncio.sleep(0.02)

    async def check_alive(self) -> None:
        """Raise DrafterError if the QEMU process has exited."""
        if self.process is not None and self.process.returncode is not None:
            raise DrafterError(f"QEMU exited with {self.process.returncode}: {self.last_error()}")

    def last_error(self) -> str:
        try:
            lines = self.qemu_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return lines[-1] if lines else "no output"

    async def boot(self) -> None:
        await self._start(incoming=False)
        await self.resume()

    async def prepare_incoming(self) -> None:
        """Start the QEMU process that :meth:`restore` will use, ahead of time (it waits,
        paused, for the state; this takes the process start out of a migration's downtime)."""
        if self.process is None or self.process.returncode is not None:
            await self._start(incoming=True)

    async def restore(self, state: Path) -> None:
        if not Path(state).is_file():
            raise DrafterError(f"state file {state} does not exist")
        await self.prepare_incoming()
        await self._ignore_shared()
        await self._pass_fd(state, os.O_RDONLY, "state")
        await self._execute("migrate-incoming", {"uri": "fd:state"})
        await self._wait_migration("restore")

    async def pause(self) -> None:
        await self._execute("stop")

    async def resume(self) -> None:
        await self._execute("cont")

    async def save_state(self, state: Path) -> None:
        tmp = Path(state).with_name(Path(state).name + ".tmp")
        await self._ignore_shared()
        await self._pass_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "state")
        await self._execute("migrate", {"uri": "fd:state"})
        await self._wait_migration("snapshot")
        os.replace(tmp, state)

    async def _pass_fd(self, path: Path, flags: int, name: str) -> None:
        """Open ``path`` here and hand the descriptor to QEMU under ``name`` (QMP
        ``getfd``): the state moves with no shell or ``cat`` process in between."""
        if self.qmp is None:
            raise DrafterError("the VM is not running")
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        try:
            self.qmp.send_fd_scm(fd)
            await self._execute("getfd", {"fdname": name})
        finally:
            os.close(fd)

    async def stop(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(QMPError, OSError, EOFError, asyncio.TimeoutError):
                await asyncio.wait_for(self.qmp.execute("quit"), 5)
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None
        proc = self.process
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                log.warning("QEMU pid %d did not quit; killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
        for sock in (self.qmp_socket, self.agent_socket, self.liveness_socket, self.console_socket):
            sock.unlink(missing_ok=True)

    # -- QMP helpers -----------------------------------------------------------

    async def _execute(self, command: str, args: dict[str, object] | None = None) -> object:
        if self.qmp is None:
            raise DrafterError("the VM is not running")
        try:
            return await self.qmp.execute(command, args)
        except QMPError as e:
            await self.check_alive()
            raise DrafterError(f"QEMU refused {command}: {e}") from e

    async def _ignore_shared(self) -> None:
        caps = [{"capability": "x-ignore-shared", "state": True}]
        await self._execute("migrate-set-capabilities", {"capabilities": caps})

    async def _wait_migration(self, what: str, timeout: float = 120.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            info = await self._execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                detail = info.get("error-desc", status) if isinstance(info, dict) else status
                raise DrafterError(f"{what} failed: {detail}")
            if loop.time() > deadline:
                raise DrafterError(f"{what} did not finish in {timeout:.0f}s")
            await asyncio.sleep(0.001)  # a switch-over waits on this: poll closely
