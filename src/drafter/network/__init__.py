"""Host networking for VMs: one network namespace per VM, reachable from the host.

Each namespace holds a tap device for the VM, a veth pair to the host and NAT
rules that map the namespace's external address to the guest address. See
docs/networking.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from drafter.network.config import NamespacePlan, NetworkConfig, default_host_interface
    from drafter.network.state import DEFAULT_STATE_DIR, NamespaceInfo, namespace_info
    from drafter.network.topology import Network

# Imported on first use (PEP 562): a VM's process needs drafter.network.follow, not
# the daemon's topology, whose pyroute2 takes 70 ms of every command's start.
_WHERE = {
    "NamespacePlan": "config", "NetworkConfig": "config", "default_host_interface": "config",
    "DEFAULT_STATE_DIR": "state", "NamespaceInfo": "state", "namespace_info": "state",
    "Network": "topology",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"drafter.network.{_WHERE[name]}"), name)


__all__ = [
    "DEFAULT_STATE_DIR",
    "NamespaceInfo",
    "NamespacePlan",
    "Network",
    "NetworkConfig",
    "default_host_interface",
    "namespace_info",
]
