"""Clients follow the VM: fail fast where it left, and one stable address that moves with it.

Two things, both described in docs/networking.md ("Following a VM"):

* **The gate.** A namespace answers connections to its external address with a TCP
  reset once its VM no longer runs there. Without any QEMU on the tap that is the
  kernel's doing (the namespace table, see :func:`drafter.network.nft.namespace_ruleset`),
  so it also holds after a ``kill -9``. While QEMU still holds the tap but the VM was
  handed over (a migration's source, paused), the VM's process puts the external
  address into the table's ``closed`` set (:meth:`Follower.left`). Clients that wait
  for an answer send nothing to reset, so the process also cuts the host's
  connections to the address (:func:`cut_connections`) when its VM leaves or stops;
  the daemon does it for a killed process (:mod:`drafter.network.carrier`).
* **The stable address.** A /32 on the host, routed to the namespace whose VM holds it
  now. Every namespace translates it the same way (DNAT to the guest address, SNAT
  back), and conntrack takes up flows in the middle, so a connection to it survives a
  move between namespaces: the guest's TCP state moves with its memory. The process
  whose VM runs takes the route over (:meth:`Follower.running`) and records it in
  ``{state_dir}/follow/{address}.json`` (the handover record). When the VM stops for
  good the address becomes unreachable until the next VM takes it.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drafter.errors import DrafterError
from drafter.network.namespaces import run_in_namespace
from drafter.network.nft import CLOSED_SET
from drafter.network.state import (
    DEFAULT_STATE_DIR,
    NamespaceInfo,
    info_file,
    namespace_info,
    process_alive,
    process_start_time,
    read_json,
    unlink,
    write_json,
)

if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger(__name__)

#: The table a VM's process adds to its namespace for its stable address.
FOLLOW_TABLE = "drafter_follow"
_MAIN_TABLE = 254
RTN_UNREACHABLE = 7  # the route type a stopped VM leaves for its stable address


def handover_file(state_dir: str | Path, address: str) -> Path:
    """Path of the handover record of stable address ``address``."""
    return Path(state_dir) / "follow" / f"{address}.json"


def parse_stable_address(text: str) -> str:
    """``text`` as a host address a VM can own; DrafterError if it cannot be one."""
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise DrafterError(f"stable address {text!r} is not an IPv4 address") from None
    if (
        address.is_loopback
        or address.is_multicast
        or address.is_unspecified
        or address.is_link_local
        or address.is_reserved
        or str(address) == "255.255.255.255"
    ):
        raise DrafterError(f"stable address {address} is not valid on this host (not unicast)")
    return str(address)


def stable_ruleset(stable: str, veth: str, guest: str) -> str:
    """The namespace's table for a stable address: the same in every namespace.

    It runs before the daemon's table (priority - 5), so flows to ``stable`` and new
    flows from the guest are translated to and from ``stable``. A flow that comes
    here mid-way (the VM moved) is taken up by conntrack from whichever side sends
    first and gets the same translation it had in the namespace before.
    """
    return f"""\
table ip {FOLLOW_TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat - 5; policy accept;
    iifname "{veth}" ip daddr {stable} meta l4proto {{ tcp, udp }} dnat to {guest}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat - 5; policy accept;
    oifname "{veth}" ip saddr {guest} snat to {stable}
  }}
}}
"""


class Follower:
    """What the process of one VM (runner or peer) does so that clients follow the VM.

    ``prepare`` before the VM resumes, ``running`` once it runs here, ``left`` when it
    was paused and handed over (its QEMU still holds the tap), ``release`` after QEMU
    stopped. A VM outside a daemon's namespace has no gate; it cannot have a stable
    address. Methods are blocking and quick (a netlink call or one ``nft``).
    """

    def __init__(
        self, netns: str | None, state_dir: str | Path, stable_address: str | None = None
    ) -> None:
        self.netns = netns
        self.state_dir = Path(state_dir)
        self.stable = parse_stable_address(stable_address) if stable_address else None
        self.info: NamespaceInfo | None = None
        self._table_made = False
        self._holding = False

    # -- before the VM runs ---------------------------------------------------------------

    def prepare(self, taking_over: bool = False) -> None:
        """Check the stable address and set up this namespace; reopen a stale gate.

        ``taking_over``: the VM comes from a peer that may hold the stable address now
        (a migration); otherwise a live holder means the address is in use.
        """
        managed = self.netns is not None and info_file(self.state_dir, self.netns).exists()
        if self.stable is not None:
            if self.netns is None:
                raise DrafterError("--stable-address needs --netns (a drafter-daemon namespace)")
            self.info = namespace_info(self.netns, self.state_dir)
            if not self.info.nft_table:
                raise DrafterError(
                    f"the drafter-daemon of {self.netns} predates stable addresses: restart it"
                )
            check_stable_address(self.stable, self.state_dir, taking_over=taking_over)
        elif managed:
            assert self.netns is not None
            try:
                self.info = namespace_info(self.netns, self.state_dir)
            except DrafterError as e:  # no gate, as before; QEMU says if the namespace is gone
                log.debug("no gate for %s: %s", self.netns, e)
        if self.info is None or not self.info.nft_table:
            return
        self._gate(closed=False)  # left closed by a process killed at switch-over
        if self.stable is not None and not taking_over:
            self._guard_route()
        if self.stable is not None:
            info = self.info
            rules = stable_ruleset(self.stable, info.namespace_veth, info.guest_address)
            # A killed predecessor in this namespace may have left its table.
            self._nft(f"add table ip {FOLLOW_TABLE}\ndelete table ip {FOLLOW_TABLE}\n" + rules)
            self._table_made = True

    # -- hand-over points -------------------------------------------------------------------

    def running(self) -> None:
        """The VM runs here now: open the gate, take the stable address's route over."""
        if self.info is None:
            return
        if self.stable is not None:
            self._take_route()  # first: the stable address's clients wait for it
        self._gate(closed=False)

    def _take_route(self) -> None:
        assert self.info is not None and self.stable is not None
        started = time.monotonic()
        from pyroute2 import IPRoute  # here, not above: it takes 70 ms to import
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            links = ipr.link_lookup(ifname=self.info.host_veth)
            if not links:
                raise DrafterError(f"host veth {self.info.host_veth} of {self.netns} is gone")
            try:
                ipr.route(
                    "replace",
                    dst=f"{self.stable}/32",
                    gateway=self.info.namespace_address,
                    oif=links[0],
                )
            except NetlinkError as e:
                raise DrafterError(f"cannot route {self.stable} to {self.netns}: {e}") from None
        self._holding = True
        write_json(
            handover_file(self.state_dir, self.stable),
            {
                "address": self.stable,
                "namespace": self.netns,
                "host_veth": self.info.host_veth,
                "pid": os.getpid(),
                "start_time": process_start_time(os.getpid()),
                "since": time.time(),
            },
        )
        log.info(
            "%s now routes to %s (%.0f ms)",
            self.stable,
            self.netns,
            (time.monotonic() - started) * 1000,
        )

    def left(self) -> None:
        """The VM was paused and handed over: its external address answers with resets,
        and the host's connections to it are cut now (a client waiting for an answer
        sends nothing that a reset could answer)."""
        if self.info is not None:
            self._gate(closed=True)
            cut_connections(self.info.external_address)

    def release(self) -> None:
        """After the VM's QEMU stopped: if the stable address still routes here (the VM
        was not handed over), cut its connections and make it unreachable; drop this
        namespace's stable-address table; the gate is the kernel's again (no VM: resets)."""
        if self.info is None:
            return
        errors: list[str] = []
        try:
            cut_connections(self.info.external_address)
        except DrafterError as e:
            errors.append(str(e))
        if self.stable is not None and self._holding:
            self._holding = False
            try:
                self._park_route()
            except DrafterError as e:
                errors.append(str(e))
        if self._table_made:
            self._table_made = False
            try:
                self._nft(f"delete table ip {FOLLOW_TABLE}")
            except DrafterError as e:
                errors.append(str(e))
        try:
            self._gate(closed=False)
        except DrafterError as e:
            errors.append(str(e))
        if errors:
            log.warning("could not undo all of the network set-up: %s", "; ".join(errors))

    # -- details ------------------------------------------------------------------------------

    def _guard_route(self) -> None:
        """Before the VM first takes the stable address: an address no route names
        would go out by the default route. It is unreachable (fails at once, nothing
        leaves the host) until the VM runs, recorded as stopped so the daemon removes it."""
        assert self.info is not None and self.stable is not None
        from pyroute2 import IPRoute  # here, not above: it takes 70 ms to import
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            if _routes_to(ipr, self.stable):
                return  # a previous holder's (stopped or handing over): taken over later
            try:
                ipr.route("replace", dst=f"{self.stable}/32", type="unreachable")
            except NetlinkError as e:
                raise DrafterError(f"cannot guard {self.stable}: {e}") from None
        self._record_stopped()

    def _record_stopped(self) -> None:
        """The handover record of an address no VM runs behind (unreachable)."""
        assert self.info is not None and self.stable is not None
        write_json(
            handover_file(self.state_dir, self.stable),
            {
                "address": self.stable,
                "namespace": self.netns,
                "host_veth": self.info.host_veth,
                "pid": 0,
                "start_time": None,
                "since": time.time(),
                "stopped": True,
            },
        )

    def _park_route(self) -> None:
        """The VM stopped here for good: cut the host's connections to the stable address
        while it still routes here, then make it unreachable (connecting fails at once;
        nothing goes out by the default route) and say so in the record. The next holder
        takes both over; the daemon removes them with its namespaces."""
        assert self.info is not None and self.stable is not None
        from pyroute2 import IPRoute  # here, not above: it takes 70 ms to import
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            links = ipr.link_lookup(ifname=self.info.host_veth)
            ours = [r for r in _routes_to(ipr, self.stable) if r.get_attr("RTA_OIF") in links]
            if not ours:
                return  # handed over: the destination routes it now
            cut_connections(self.stable)
            try:
                ipr.route("replace", dst=f"{self.stable}/32", type="unreachable")
            except NetlinkError as e:
                raise DrafterError(f"cannot unroute {self.stable}: {e}") from None
        self._record_stopped()
        log.info("%s is unreachable: its VM stopped", self.stable)

    def _gate(self, closed: bool) -> None:
        assert self.info is not None and self.netns is not None
        if self.info.nft_table:
            set_gate(self.netns, self.info.nft_table, self.info.external_address, closed)

    def _nft(self, script: str) -> None:
        assert self.netns is not None
        run_in_namespace(self.netns, ["nft", "-f", "-"], input_text=script)


def set_gate(namespace: str, table: str, address: str, closed: bool) -> None:
    """Put ``address`` into the ``closed`` set of the namespace's table (its connections
    get resets) or take it out (the kernel decides: resets only without a VM)."""
    element = f"ip {table} {CLOSED_SET} {{ {address} }}"
    # add-then-delete keeps "open" idempotent in one transaction.
    script = f"add element {element}\n" + ("" if closed else f"delete element {element}\n")
    run_in_namespace(namespace, ["nft", "-f", "-"], input_text=script)
    log.debug("%s: gate of %s %s", namespace, address, "closed" if closed else "open")


def cut_connections(address: str) -> None:
    """Abort every TCP connection of this host to ``address`` (``ss -K``): their
    programs get an error at once and the kernel sends the VM's side a reset.

    Only the host can reach a namespace's external address, so for it these are all
    the clients there are.
    """
    argv = ["ss", "-K", "-t", "-n", "dst", address]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise DrafterError(f"cannot cut connections to {address}: {lines[-1] if lines else '?'}")
    cut = max(0, len(proc.stdout.strip().splitlines()) - 1)
    if cut:
        log.info("cut %d connection(s) to %s", cut, address)


def check_stable_address(address: str, state_dir: str | Path, taking_over: bool = False) -> None:
    """DrafterError (one line) unless ``address`` can be this VM's stable address here:
    not on a host interface, not inside a host route, not held by another live VM."""
    addr = ipaddress.IPv4Address(address)
    record = handover_file(state_dir, address)
    data = read_json(record)
    holder_alive = False
    if data is not None:
        pid = int(data.get("pid") or 0)
        holder_alive = process_alive(pid, data.get("start_time"))
        if holder_alive and not taking_over and pid != os.getpid():
            raise DrafterError(
                f"stable address {address} is already in use by the VM of pid {pid} "
                f"in namespace {data.get('namespace')}"
            )
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        for a in ipr.get_addr(family=2):
            local = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            if local and ipaddress.IPv4Address(local) == addr:
                raise DrafterError(
                    f"stable address {address} is already in use on host interface "
                    f"{names.get(a['index'], '?')}"
                )
        for r in ipr.get_routes(family=2, table=_MAIN_TABLE):
            length = r.get("dst_len") or 0
            if not length:
                continue  # the default route
            net = ipaddress.IPv4Network(f"{r.get_attr('RTA_DST')}/{length}")
            if addr not in net:
                continue
            oif = r.get_attr("RTA_OIF")
            dev = names.get(oif, "?") if oif else f"type {r.get('type')}"
            if (
                length == 32
                and data is not None
                and (dev == data.get("host_veth") or r.get("type") == RTN_UNREACHABLE)
            ):
                continue  # a previous holder's route (live and handing over, dead, stopped)
            if length == 32:
                raise DrafterError(
                    f"stable address {address} is already in use on this host (a route, {dev})"
                )
            raise DrafterError(
                f"stable address {address} is not valid on this host: it is inside the host "
                f"route {net} dev {dev}"
            )
        for r in ipr.get_routes(family=2, table=255):  # local table: addresses, broadcasts
            dst = r.get_attr("RTA_DST")
            if dst and ipaddress.IPv4Address(dst) == addr:
                raise DrafterError(f"stable address {address} is a local address of this host")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the commands that run a VM: --state-dir and --stable-address."""
    parser.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR,
        help="drafter-daemon's --state-dir (namespace info, stable address records)",
    )  # fmt: skip
    parser.add_argument(
        "--stable-address", default="", metavar="ADDRESS",
        help="a host address that reaches this VM in whichever namespace of this host it "
        "runs (taken over at each migration; see docs/networking.md)",
    )  # fmt: skip


def _routes_to(ipr: IPRoute, address: str) -> list[Any]:
    """The main table's /32 routes to ``address`` (a dump: ``get_routes(dst=)`` would
    look the address up instead, and fail for an unreachable one)."""
    return [
        r
        for r in ipr.get_routes(family=2, table=_MAIN_TABLE)
        if r.get("dst_len") == 32 and r.get_attr("RTA_DST") == address
    ]


def remove_records(state_dir: str | Path, namespaces: set[str]) -> None:
    """The daemon's teardown: the handover records of stable addresses last held in
    ``namespaces``, and the unreachable routes of those whose VM stopped (routes via
    the namespaces' veths go with the veths)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        for record in (Path(state_dir) / "follow").glob("*.json"):
            try:
                data = read_json(record)
            except DrafterError:
                continue
            if data is None or data.get("namespace") not in namespaces:
                continue
            address = str(data.get("address"))
            dst = f"{address}/32"
            try:
                for r in _routes_to(ipr, address):
                    if r.get("type") == RTN_UNREACHABLE:
                        ipr.route("del", dst=dst, type="unreachable")
            except (NetlinkError, ValueError) as e:
                log.warning("cannot remove the route of %s: %s", dst, e)
            unlink(record)
