"""Network configuration and the address plan derived from it.

Nothing here touches the system except :func:`default_host_interface` and
:func:`NetworkConfig.resolved_host_interface`, which read the host's routes and links.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import asdict, dataclass
from typing import Any

from pyroute2 import IPRoute

from drafter.errors import DrafterError

#: Longest interface name Linux accepts (IFNAMSIZ - 1).
IFNAME_MAX = 15
#: Name of the namespace-side veth, inside every namespace.
NAMESPACE_VETH = "veth0"

_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


@dataclass(frozen=True)
class NetworkConfig:
    """What the daemon builds; the field names follow the seed's flags.

    ``host_interface`` ``None`` means: the interface holding the default route.
    """

    host_interface: str | None = None
    host_veth_cidr: str = "10.0.8.0/22"
    namespace_veth_cidr: str = "10.0.15.0/24"
    namespace_interface: str = "tap0"
    namespace_interface_gateway: str = "172.100.100.1"
    namespace_interface_netmask: int = 30
    namespace_interface_ip: str = "172.100.100.2"
    namespace_interface_mac: str = "02:0e:d9:fd:68:3d"
    namespace_prefix: str = "ark"
    namespace_count: int = 4
    state_dir: str = "/run/drafter"

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain JSON-able data."""
        return asdict(self)

    def validate(self) -> None:
        """Check the values that do not need the system; raise DrafterError."""
        if not _PREFIX_RE.match(self.namespace_prefix):
            raise DrafterError(
                f"invalid namespace prefix {self.namespace_prefix!r}: use 1-32 letters, "
                "digits, '_' or '-', starting with a letter"
            )
        if self.namespace_count < 1:
            raise DrafterError(f"namespace count must be at least 1, not {self.namespace_count}")
        if not 0 < len(self.namespace_interface) <= IFNAME_MAX or "/" in self.namespace_interface:
            raise DrafterError(f"invalid namespace interface name {self.namespace_interface!r}")
        if self.namespace_interface == NAMESPACE_VETH:
            raise DrafterError(f"namespace interface may not be named {NAMESPACE_VETH!r}")
        if not _MAC_RE.match(self.namespace_interface_mac):
            raise DrafterError(f"invalid MAC address {self.namespace_interface_mac!r}")
        if not 0 < self.namespace_interface_netmask <= 32:
            raise DrafterError(f"invalid netmask /{self.namespace_interface_netmask}")
        host_net = _network(self.host_veth_cidr, "host veth CIDR")
        ns_net = _network(self.namespace_veth_cidr, "namespace veth CIDR")
        if host_net.overlaps(ns_net):
            raise DrafterError(f"host veth CIDR {host_net} overlaps namespace veth CIDR {ns_net}")
        gateway = _address(self.namespace_interface_gateway, "namespace interface gateway")
        guest = _address(self.namespace_interface_ip, "namespace interface IP")
        guest_net = ipaddress.IPv4Network(
            f"{gateway}/{self.namespace_interface_netmask}", strict=False
        )
        if guest not in guest_net or guest == gateway:
            raise DrafterError(
                f"namespace interface IP {guest} is not a distinct address in {guest_net}"
            )
        for net in (host_net, ns_net):
            if net.overlaps(guest_net):
                raise DrafterError(f"{net} overlaps the guest network {guest_net}")
        pairs = host_net.num_addresses // 4
        if self.namespace_count > pairs:
            raise DrafterError(
                f"host veth CIDR {host_net} has room for {pairs} namespaces, "
                f"not {self.namespace_count}"
            )
        externals = ns_net.num_addresses - 2 if ns_net.prefixlen < 31 else ns_net.num_addresses
        if self.namespace_count > externals:
            raise DrafterError(
                f"namespace veth CIDR {ns_net} has room for {externals} namespaces, "
                f"not {self.namespace_count}"
            )

    def resolved_host_interface(self) -> str:
        """The host interface to use; raise DrafterError if it does not exist."""
        name = self.host_interface or default_host_interface()
        with IPRoute() as ipr:
            if not ipr.link_lookup(ifname=name):
                raise DrafterError(f"host interface {name!r} does not exist")
        return name

    @property
    def nft_table(self) -> str:
        """Name of the daemon's own host nftables table (family inet)."""
        return "drafter_" + re.sub(r"[^A-Za-z0-9_]", "_", self.namespace_prefix)


@dataclass(frozen=True)
class NamespacePlan:
    """Names and addresses of one namespace, as the daemon makes it."""

    index: int
    namespace: str
    host_veth: str
    namespace_veth: str
    host_address: str
    namespace_address: str
    external_address: str
    guest_address: str

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-able data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NamespacePlan:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def host_veth_name(prefix: str, index: int) -> str:
    """Host-side veth name for namespace ``index``: short, derived from prefix and index."""
    for name in (f"{prefix}{index}-veth", f"{prefix}{index}-h"):
        if len(name) <= IFNAME_MAX:
            return name
    digest = hashlib.sha1(prefix.encode()).hexdigest()[:6]
    return f"drv{digest}-{index}"[:IFNAME_MAX]


def plan_namespaces(config: NetworkConfig) -> list[NamespacePlan]:
    """Names and addresses for every namespace of ``config`` (validated first)."""
    config.validate()
    host_net = ipaddress.IPv4Network(config.host_veth_cidr, strict=False)
    ns_net = ipaddress.IPv4Network(config.namespace_veth_cidr, strict=False)
    plans = []
    for i in range(config.namespace_count):
        pair_base = host_net.network_address + 4 * i
        plans.append(
            NamespacePlan(
                index=i,
                namespace=f"{config.namespace_prefix}{i}",
                host_veth=host_veth_name(config.namespace_prefix, i),
                namespace_veth=NAMESPACE_VETH,
                host_address=str(pair_base + 1),
                namespace_address=str(pair_base + 2),
                external_address=str(ns_net.network_address + i + 1),
                guest_address=config.namespace_interface_ip,
            )
        )
    return plans


def default_host_interface() -> str:
    """Name of the interface holding the IPv4 default route."""
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=2):
            if route.get("dst_len") == 0 and route.get("table") in (254, None):
                oif = route.get("RTA_OIF") or route.get("oif")
                if oif is None:
                    continue
                links = ipr.get_links(oif)
                if links:
                    return str(links[0].get("ifname"))
    raise DrafterError("no default route on the host: pass --host-interface")


def _network(text: str, what: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError as e:
        raise DrafterError(f"invalid {what} {text!r}: {e}") from None


def _address(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError as e:
        raise DrafterError(f"invalid {what} {text!r}: {e}") from None
