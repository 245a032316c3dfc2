"""The host-side network the daemon builds: namespaces with a tap for the VM, reachable
from the host through one "external" address each, and isolated from each other.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from drafter.errors import DrafterError
from drafter.network import follow, nft
from drafter.network.config import NamespacePlan, NetworkConfig, plan_namespaces
from drafter.network.namespaces import (
    create_namespace,
    namespace_exists,
    remove_namespace,
    write_sysctl,
)
from drafter.network.state import (
    DaemonLock,
    NamespaceInfo,
    info_file,
    lock_file,
    process_start_time,
    read_json,
    state_file,
    unlink,
    write_json,
)

log = logging.getLogger(__name__)

_PAIR_PREFIX = 30


class Network:
    """The namespaces of one prefix, from :meth:`open` until :meth:`close`.

    Use as a context manager, or call :meth:`open` and :meth:`close` yourself.
    Opening after a daemon of the same prefix was killed (``kill -9``) first removes
    what that daemon left behind, as listed in its state file.
    """

    def __init__(self, config: NetworkConfig | None = None) -> None:
        self.config = config or NetworkConfig()
        self.plans: list[NamespacePlan] = []
        self.host_interface: str | None = None
        self._lock = DaemonLock(lock_file(self.config.state_dir, self.config.namespace_prefix))
        self._opened = False

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Network:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Create every namespace, veth, address, route and nftables table."""
        if self._opened:
            return
        if os.geteuid() != 0:
            raise DrafterError("creating network namespaces needs root")
        cfg = self.config
        plans = plan_namespaces(cfg)
        self.host_interface = cfg.resolved_host_interface()
        statef = state_file(cfg.state_dir, cfg.namespace_prefix)
        old = read_json(statef)
        hint = f" (pid {old.get('pid')})" if old else ""
        self._lock.acquire(f"{hint} for namespace prefix {cfg.namespace_prefix!r}")
        try:
            if old is not None:
                self._clean_stale(old)
            self._check_conflicts(plans)
            self.plans = plans
            write_json(statef, self._state())
            try:
                self._build()
            except BaseException:
                self._teardown(self.plans, os.getpid())
                raise
        except BaseException:
            self._lock.release()
            self.plans = []
            raise
        self._opened = True
        log.debug("network for prefix %s is up", cfg.namespace_prefix)

    def close(self) -> None:
        """Remove everything :meth:`open` made (namespaces, veths, tables, state files)."""
        if not self._opened:
            return
        self._opened = False
        try:
            self._teardown(self.plans, os.getpid())
        finally:
            self._lock.release()

    # -- what the daemon offers ---------------------------------------------------------

    @property
    def namespaces(self) -> list[NamespaceInfo]:
        """Info about every namespace, in index order."""
        return [self._info(p) for p in self.plans]

    def _info(self, plan: NamespacePlan) -> NamespaceInfo:
        return NamespaceInfo(
            namespace=plan.namespace,
            external_address=plan.external_address,
            host_veth=plan.host_veth,
            host_address=plan.host_address,
            namespace_address=plan.namespace_address,
            guest_address=plan.guest_address,
            daemon_pid=os.getpid(),
            nft_table=self.config.nft_table,
            namespace_veth=plan.namespace_veth,
        )

    def _state(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "pid": pid,
            "start_time": process_start_time(pid),
            "prefix": self.config.namespace_prefix,
            "host_interface": self.host_interface,
            "nft_table": f"{nft.FAMILY} {self.config.nft_table}",
            "config": self.config.to_dict(),
            "namespaces": [p.to_dict() for p in self.plans],
        }

    # -- building -----------------------------------------------------------------------

    def _build(self) -> None:
        cfg = self.config
        # Isolation first, so no veth is ever up without it.
        nft.create_host_table(cfg.nft_table, [p.host_veth for p in self.plans])
        for plan in self.plans:
            self._build_namespace(plan)
            write_json(info_file(cfg.state_dir, plan.namespace), self._info(plan).to_dict())

    def _build_namespace(self, plan: NamespacePlan) -> None:
        cfg = self.config
        ns = plan.namespace
        log.debug("building %s", ns)
        create_namespace(ns)
        try:
            with IPRoute() as ipr:
                ipr.link(
                    "add",
                    ifname=plan.host_veth,
                    kind="veth",
                    peer={"ifname": plan.namespace_veth, "net_ns_fd": ns},
                )
                (idx,) = ipr.link_lookup(ifname=plan.host_veth)
                ipr.addr("add", index=idx, address=plan.host_address, prefixlen=_PAIR_PREFIX)
                ipr.link("set", index=idx, state="up")
            with IPRoute(netns=ns, flags=0) as ipr:
                (lo,) = ipr.link_lookup(ifname="lo")
                ipr.link("set", index=lo, state="up")
                ipr.link("add", ifname=cfg.namespace_interface, kind="tuntap", mode="tap")
                (tap,) = ipr.link_lookup(ifname=cfg.namespace_interface)
                ipr.link("set", index=tap, address=cfg.namespace_interface_mac)
                ipr.addr(
                    "add",
                    index=tap,
                    address=cfg.namespace_interface_gateway,
                    prefixlen=cfg.namespace_interface_netmask,
                )
                ipr.link("set", index=tap, state="up")
                (veth,) = ipr.link_lookup(ifname=plan.namespace_veth)
                ipr.addr("add", index=veth, address=plan.namespace_address, prefixlen=_PAIR_PREFIX)
                ipr.addr("add", index=veth, address=plan.external_address, prefixlen=32)
                ipr.link("set", index=veth, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=plan.host_address, oif=veth)
            with IPRoute() as ipr:
                (idx,) = ipr.link_lookup(ifname=plan.host_veth)
                ipr.route(
                    "add",
                    dst=f"{plan.external_address}/32",
                    gateway=plan.namespace_address,
                    oif=idx,
                )
        except NetlinkError as e:
            raise DrafterError(f"could not set up namespace {ns!r}: {e}") from None
        write_sysctl(ns, "net.ipv4.ip_forward", "1")
        # Fail fast: without a VM on the tap its route is ignored and the forward
        # chain answers with a reset (see nft.namespace_ruleset); no redirects back.
        for key in ("all", cfg.namespace_interface):
            write_sysctl(ns, f"net.ipv4.conf.{key}.ignore_routes_with_linkdown", "1")
        for key in ("all", plan.namespace_veth):
            write_sysctl(ns, f"net.ipv4.conf.{key}.send_redirects", "0")
        nft.create_namespace_table(
            ns,
            cfg.nft_table,
            plan.namespace_veth,
            cfg.namespace_interface,
            plan.external_address,
            plan.guest_address,
        )
        # Connections that follow a VM here arrive mid-flow: conntrack must take them
        # up (the kernel's default, made explicit; the table above loaded conntrack),
        # and must not judge their sequence numbers by an entry left from an earlier
        # visit of the VM (out of window: no NAT, a reset), so it only maps addresses.
        write_sysctl(ns, "net.netfilter.nf_conntrack_tcp_loose", "1")
        write_sysctl(ns, "net.netfilter.nf_conntrack_tcp_be_liberal", "1")
        log.debug(
            "%s: host %s -> external %s -> guest %s",
            ns,
            plan.host_address,
            plan.external_address,
            plan.guest_address,
        )

    # -- checks ---------------------------------------------------------------------------

    def _check_conflicts(self, plans: list[NamespacePlan]) -> None:
        cfg = self.config
        for plan in plans:
            if namespace_exists(plan.namespace):
                raise DrafterError(
                    f"network namespace {plan.namespace!r} already exists and is not "
                    f"managed by drafter-daemon (remove it with 'ip netns del "
                    f"{plan.namespace}' or choose another --namespace-prefix)"
                )
        if nft.table_exists(cfg.nft_table):
            raise DrafterError(
                f"nftables table {nft.FAMILY} {cfg.nft_table} already exists "
                "(choose another --namespace-prefix)"
            )
        with IPRoute() as ipr:
            names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
            for plan in plans:
                if plan.host_veth in names.values():
                    raise DrafterError(
                        f"host interface {plan.host_veth!r} already exists "
                        "(choose another --namespace-prefix)"
                    )
            used: dict[ipaddress.IPv4Address, str] = {}
            for a in ipr.get_addr(family=2):
                addr = a.get("IFA_LOCAL") or a.get("IFA_ADDRESS")
                if addr:
                    used[ipaddress.IPv4Address(addr)] = str(names.get(a["index"], "?"))
            routes: list[tuple[ipaddress.IPv4Network, str]] = []
            for r in ipr.get_routes(family=2, table=254):
                if not r.get("dst_len"):
                    continue
                dst = ipaddress.IPv4Network(f"{r.get('RTA_DST')}/{r['dst_len']}")
                routes.append((dst, str(names.get(r.get("RTA_OIF"), "?"))))
        for plan in plans:
            for what, text in (
                ("host veth address", plan.host_address),
                ("namespace veth address", plan.namespace_address),
                ("external address", plan.external_address),
            ):
                addr = ipaddress.IPv4Address(text)
                if addr in used:
                    raise DrafterError(
                        f"{what} {addr} of {plan.namespace} is already in use on host "
                        f"interface {used[addr]} (address already in use)"
                    )
            pair = ipaddress.IPv4Network(f"{plan.host_address}/{_PAIR_PREFIX}", strict=False)
            ext = ipaddress.IPv4Network(f"{plan.external_address}/32")
            for dst, dev in routes:
                for net in (pair, ext):
                    if net.overlaps(dst):
                        raise DrafterError(
                            f"{net} of {plan.namespace} overlaps the host route {dst} "
                            f"dev {dev} (address already in use)"
                        )

    # -- teardown -------------------------------------------------------------------------

    def _clean_stale(self, old: dict[str, Any]) -> None:
        """Remove what a dead daemon (its state file ``old``) left behind."""
        pid = old.get("pid")
        log.warning("cleaning up after drafter-daemon pid %s, which is gone", pid)
        try:
            plans = [NamespacePlan.from_dict(d) for d in old.get("namespaces", [])]
        except (KeyError, TypeError) as e:
            raise DrafterError(f"cannot read stale state file: missing {e}") from None
        table = str(old.get("nft_table", "")).split()
        self._teardown(plans, int(pid or 0), table[-1] if table else None)

    def _teardown(self, plans: list[NamespacePlan], pid: int, table: str | None = None) -> None:
        cfg = self.config
        errors: list[str] = []
        with IPRoute() as ipr:
            for plan in plans:
                try:
                    links = ipr.get_links(ifname=plan.host_veth)
                except NetlinkError:
                    links = []
                for link in links:
                    if link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) not in (None, "veth"):
                        continue
                    try:
                        log.debug("deleting veth %s", plan.host_veth)
                        ipr.link("del", index=link["index"])
                    except NetlinkError as e:
                        errors.append(f"veth {plan.host_veth}: {e}")
        for plan in plans:
            try:
                remove_namespace(plan.namespace)
            except OSError as e:
                errors.append(f"namespace {plan.namespace}: {e}")
            info = info_file(cfg.state_dir, plan.namespace)
            data = _read_json_quiet(info)
            if data is not None and data.get("daemon_pid") in (pid, None):
                unlink(info)
        # Stable addresses last held in these namespaces (drafter.network.follow).
        try:
            follow.remove_records(cfg.state_dir, {plan.namespace for plan in plans})
        except (OSError, NetlinkError) as e:
            errors.append(f"stable addresses: {e}")
        try:
            nft.delete_table(table or cfg.nft_table)
        except DrafterError as e:
            errors.append(str(e))
        unlink(state_file(cfg.state_dir, cfg.namespace_prefix))
        for directory in ("netns", "follow"):
            with contextlib.suppress(OSError):
                (Path(cfg.state_dir) / directory).rmdir()  # only if empty
        if errors:
            raise DrafterError("teardown incomplete: " + "; ".join(errors))


def _read_json_quiet(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except DrafterError:
        return None
