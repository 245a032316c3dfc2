"""Host networking for VMs: one network namespace per VM, reachable from the host.

Each namespace holds a tap device for the VM, a veth pair to the host and NAT
rules that map the namespace's external address to the guest address. See
docs/networking.md.
"""

from drafter.network.config import NamespacePlan, NetworkConfig, default_host_interface
from drafter.network.state import DEFAULT_STATE_DIR, NamespaceInfo, namespace_info
from drafter.network.topology import Network

__all__ = [
    "DEFAULT_STATE_DIR",
    "NamespaceInfo",
    "NamespacePlan",
    "Network",
    "NetworkConfig",
    "default_host_interface",
    "namespace_info",
]
