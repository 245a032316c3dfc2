"""What every VMM driver offers: boot, pause, save state, restore, resume, stop."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from drafter.errors import DrafterError

MIN_MEMORY_MIB = 128  # what the guest kernel needs to boot
MAX_MEMORY_MIB = 1 << 20  # 1 TiB: far beyond a microVM, far below any overflow
MAX_CPUS = 288  # QEMU's limit for the microvm machine
# The x86 kernel's COMMAND_LINE_SIZE is 2048 bytes with the final NUL; longer is cut.
MAX_BOOT_ARGS = 2047
_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
DEFAULT_MAC = "02:0e:d9:fd:68:3d"
# tsc_early_khz: under TCG the kernel cannot calibrate the TSC against the PIT.
DEFAULT_BOOT_ARGS = (
    "console=ttyS0 panic=-1 reboot=k root=/dev/vda rw quiet tsc_early_khz=2000000 "
    "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
)


@dataclass
class MachineConfig:
    """The shape of a VM and where its resources are."""

    kernel: Path
    initramfs: Path
    disk: Path
    memory: Path  # file that holds guest RAM, mapped shared by the VMM
    memory_mib: int = 512
    cpus: int = 1
    boot_args: str = DEFAULT_BOOT_ARGS
    netns: str | None = None  # network namespace whose tap device the VM uses
    tap: str = "tap0"
    mac: str = DEFAULT_MAC
    accel: str = "auto"  # auto, kvm or tcg


def brief(value: object) -> str:
    """A value for an error line: escaped (repr) and short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_shape(memory_mib: object, cpus: object, boot_args: object, mac: object) -> None:
    """Check the types and ranges of a VM's shape, whatever the host; ValueError says
    which field is wrong (the caller says where it came from).

    Integers must be ints (not booleans or floats), the MAC a unicast address (it goes
    into QEMU's comma-separated ``-device`` option), the boot arguments printable ASCII
    (no NUL, no newline) short enough for the kernel.
    """
    if type(memory_mib) is not int or not 1 <= memory_mib <= MAX_MEMORY_MIB:
        raise ValueError(
            f"memory_mib must be a whole number of MiB from 1 to {MAX_MEMORY_MIB}, "
            f"not {brief(memory_mib)}"
        )
    if type(cpus) is not int or not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"cpus must be a whole number from 1 to {MAX_CPUS}, not {brief(cpus)}")
    if not isinstance(mac, str) or not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1:
        raise ValueError(
            f"mac must be a unicast MAC address such as {DEFAULT_MAC}, not {brief(mac)}"
        )
    if (
        not isinstance(boot_args, str)
        or len(boot_args) > MAX_BOOT_ARGS
        or not all(" " <= c <= "~" for c in boot_args)
    ):
        raise ValueError(
            f"boot_args must be printable ASCII of at most {MAX_BOOT_ARGS} characters, "
            f"not {brief(boot_args)}"
        )


def check_host(memory_mib: int, cpus: int) -> None:
    """DrafterError if this host cannot run a VM of this shape: less memory than the
    kernel needs, or more vCPUs than the host has CPUs."""
    if memory_mib < MIN_MEMORY_MIB:
        raise DrafterError(
            f"memory size {memory_mib} MiB is too small for the kernel "
            f"(at least {MIN_MEMORY_MIB} MiB)"
        )
    host_cpus = min(os.cpu_count() or 64, MAX_CPUS)
    if not 1 <= cpus <= host_cpus:
        raise DrafterError(f"the VM wants {cpus} vCPUs; this host has {host_cpus} CPUs")


class Machine(Protocol):
    """A running (or paused) VM. All methods raise DrafterError on failure."""

    config: MachineConfig
    agent_socket: Path  # host end of the guest agent channel
    liveness_socket: Path  # host end of the liveness channel
    console_socket: Path  # serial console (connect for input and output)
    console_log: Path  # everything the serial console printed

    async def boot(self) -> None:
        """Start the VM from kernel, initramfs and disk."""

    async def prepare_incoming(self) -> None:
        """Optionally start the VMM early, waiting for the state :meth:`restore` brings."""

    async def restore(self, state: Path) -> None:
        """Start a VM paused, from device ``state`` plus the memory file."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def save_state(self, state: Path) -> None:
        """Write the device state of the paused VM to ``state`` (RAM stays in memory)."""

    async def stop(self) -> None:
        """Stop the VM and its process; safe to call more than once."""
