"""What every VMM driver offers: boot, pause, save state, restore, resume, stop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MIN_MEMORY_MIB = 128
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
