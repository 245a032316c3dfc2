"""VMM drivers: one interface (:class:`Machine`), one implementation (QEMU microvm)."""

from drafter.vmm.base import Machine, MachineConfig
from drafter.vmm.qemu import QemuMachine

__all__ = ["Machine", "MachineConfig", "QemuMachine"]
