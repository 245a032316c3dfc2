"""drafter-daemon: set up the VM network namespaces, keep them until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from drafter import cli
from drafter.network import Network, NetworkConfig
from drafter.network.carrier import CarrierWatch

PROG = "drafter-daemon"
log = logging.getLogger(__name__)


def _args(argv: list[str] | None) -> tuple[NetworkConfig, bool]:
    d = NetworkConfig()
    p = cli.parser(PROG, "Create network namespaces for VMs and keep them until interrupted.")
    p.add_argument(
        "--host-interface",
        default=None,
        help="host interface (default: the one holding the default route)",
    )
    p.add_argument("--host-veth-cidr", default=d.host_veth_cidr, help="CIDR for the veth pairs")
    p.add_argument(
        "--namespace-veth-cidr",
        default=d.namespace_veth_cidr,
        help="CIDR for the external addresses the host reaches the VMs at",
    )
    p.add_argument(
        "--namespace-interface", default=d.namespace_interface, help="tap device for the VM"
    )
    p.add_argument(
        "--namespace-interface-gateway",
        default=d.namespace_interface_gateway,
        help="address of the tap device (the guest's gateway)",
    )
    p.add_argument(
        "--namespace-interface-netmask",
        type=int,
        default=d.namespace_interface_netmask,
        help="prefix length of the tap device's network",
    )
    p.add_argument(
        "--namespace-interface-ip",
        default=d.namespace_interface_ip,
        help="the guest's address",
    )
    p.add_argument(
        "--namespace-interface-mac",
        default=d.namespace_interface_mac,
        help="MAC address of the tap device",
    )
    p.add_argument("--namespace-prefix", default=d.namespace_prefix, help="namespace name prefix")
    p.add_argument(
        "--namespace-count", type=int, default=d.namespace_count, help="namespaces to create"
    )
    p.add_argument("--state-dir", default=d.state_dir, help="where state files go")
    a = p.parse_args(argv)
    cfg = NetworkConfig(
        host_interface=a.host_interface,
        host_veth_cidr=a.host_veth_cidr,
        namespace_veth_cidr=a.namespace_veth_cidr,
        namespace_interface=a.namespace_interface,
        namespace_interface_gateway=a.namespace_interface_gateway,
        namespace_interface_netmask=a.namespace_interface_netmask,
        namespace_interface_ip=a.namespace_interface_ip,
        namespace_interface_mac=a.namespace_interface_mac,
        namespace_prefix=a.namespace_prefix,
        namespace_count=a.namespace_count,
        state_dir=a.state_dir,
    )
    return cfg, a.verbose


def _serve(cfg: NetworkConfig) -> int:
    cli.require_root(PROG)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.debug("got signal %d", signum)
        stop.set()

    # Handle signals from the start so a signal during setup still tears down.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with Network(cfg) as net:
        for info in net.namespaces:
            print(
                f"{info.namespace}: VM reachable from the host at {info.external_address} "
                f"(guest {info.guest_address} on {cfg.namespace_interface})",
                flush=True,
            )
        # A VM whose process was killed: its clients get an error, not silence.
        taps = {i.namespace: (cfg.namespace_interface, i.external_address) for i in net.namespaces}
        watch = CarrierWatch(taps, cfg.nft_table)
        watch.start()
        try:
            print(f"ready: {len(net.namespaces)} namespaces; press Ctrl-C to tear down", flush=True)
            while not stop.wait(3600):
                pass
        finally:
            watch.stop()
        log.debug("tearing down")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of drafter-daemon."""
    cfg, verbose = _args(argv)
    cli.setup_logging(verbose)
    return cli.run(PROG, lambda: _serve(cfg))
