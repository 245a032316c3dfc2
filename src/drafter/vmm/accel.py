"""Choose the accelerator: KVM when the CPU and /dev/kvm can run a guest, TCG otherwise."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from drafter.errors import DrafterError

log = logging.getLogger(__name__)

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


def cpu_has_virtualization(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU flags show vmx (Intel) or svm (AMD), as the seed checks."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return "vmx" in flags or "svm" in flags
    return False


def kvm_usable(dev: str = "/dev/kvm") -> bool:
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def choose(requested: str = "auto") -> str:
    """The accelerator to use: ``kvm`` or ``tcg``.

    A /dev/kvm alone is not trusted: some hosts expose a KVM that cannot run a
    Linux guest (no vmx/svm), so auto needs both the CPU flags and the device.
    """
    if requested not in ("auto", "kvm", "tcg"):
        raise DrafterError(f"unknown accelerator {requested!r} (use auto, kvm or tcg)")
    if requested == "tcg":
        chosen = "tcg"
    elif requested == "kvm":
        if not kvm_usable():
            raise DrafterError("--accel kvm: /dev/kvm is missing or unusable")
        chosen = "kvm"
    else:
        chosen = "kvm" if cpu_has_virtualization() and kvm_usable() else "tcg"
    log.info("accelerator: %s%s", chosen, " (software emulation)" if chosen == "tcg" else "")
    return chosen
