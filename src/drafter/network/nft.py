"""The nftables rules drafter owns, through the ``nft`` command.

The daemon owns exactly one host table (family ``inet``) and one table in each of
its namespaces; it only ever creates and deletes those whole tables and never
flushes or edits anything else.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

from drafter.errors import DrafterError
from drafter.network.namespaces import run_in_namespace

log = logging.getLogger(__name__)

FAMILY = "inet"


def _nft(argv: list[str], input_text: str | None = None) -> str:
    if shutil.which("nft") is None:
        raise DrafterError("the nft command is missing (install the nftables package)")
    proc = subprocess.run(
        ["nft", *argv], input=input_text, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise DrafterError(f"nft {' '.join(argv)} failed: {lines[0] if lines else 'error'}")
    return proc.stdout


def table_exists(name: str, family: str = FAMILY) -> bool:
    """Whether host table ``family name`` exists."""
    data = json.loads(_nft(["-j", "list", "tables"]) or "{}")
    for item in data.get("nftables", []):
        table = item.get("table")
        if table and table.get("name") == name and table.get("family") == family:
            return True
    return False


def delete_table(name: str, family: str = FAMILY) -> bool:
    """Delete host table ``family name`` if it exists; False if it did not."""
    if not table_exists(name, family):
        return False
    log.debug("deleting nft table %s %s", family, name)
    _nft(["delete", "table", family, name])
    return True


def isolation_ruleset(name: str, host_veths: list[str]) -> str:
    """The host table: no forwarding between, into or out of the namespaces' veths,
    and nothing from a namespace to the host itself but answers to the host.

    The host reaches the VMs with its own (locally generated) packets, which never
    pass the forward hook, so the forward drops only stop namespaces reaching each
    other or anything beyond the host. The input drop stops a VM reaching the
    host's own services (a metrics port, a registry, sshd) on any of its addresses:
    only packets of connections the host opened (and their ICMP errors) come in.
    Nothing a VM needs starts there: its agent speaks over a virtio channel, and the
    host's forwards and clients open their connections from the host.
    """
    veths = ", ".join(f'"{v}"' for v in host_veths)
    return f"""\
table {FAMILY} {name} {{
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname {{ {veths} }} oifname {{ {veths} }} counter drop comment "isolation"
    iifname {{ {veths} }} counter drop comment "no forwarding out of namespaces"
    oifname {{ {veths} }} counter drop comment "no forwarding into namespaces"
  }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname {{ {veths} }} ct state established,related accept comment "answers to the host"
    iifname {{ {veths} }} counter drop comment "no namespace reaches the host"
  }}
}}
"""


def create_host_table(name: str, host_veths: list[str]) -> None:
    """Create the host table ``inet name`` (error if it already exists)."""
    if table_exists(name):
        raise DrafterError(f"nftables table {FAMILY} {name} already exists")
    log.debug("creating nft table %s %s for %s", FAMILY, name, host_veths)
    _nft(["-f", "-"], isolation_ruleset(name, host_veths))


#: The set, in each namespace table, of external addresses whose VM has stopped running
#: there while its QEMU still holds the tap (paused for a migration's switch-over).
CLOSED_SET = "closed"


def namespace_ruleset(name: str, veth: str, tap: str, external: str, guest: str) -> str:
    """The namespace table: external address <-> guest address, and fail fast.

    When no VM runs behind ``tap`` (no QEMU holds it: no carrier), the route to the
    guest is ignored (``ignore_routes_with_linkdown``) and forwarded packets would
    leave by ``veth`` again: those are answered with a TCP reset (ICMP for the rest)
    instead of vanishing. The same happens to connections to ``external`` while its
    address is in the set ``closed`` (the VM was paused and handed over elsewhere).
    """
    left = f'iifname "{veth}" ct original ip daddr @{CLOSED_SET}'
    gone = f'iifname "{veth}" oifname "{veth}"'  # no route to the guest: back out
    unreachable = "reject with icmp type host-unreachable"
    return f"""\
table ip {name} {{
  set {CLOSED_SET} {{
    type ipv4_addr
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{veth}" ip daddr {external} meta l4proto {{ tcp, udp }} dnat to {guest}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{veth}" ip saddr {guest} snat to {external}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    {left} meta l4proto tcp counter reject with tcp reset comment "left: reset"
    {left} counter {unreachable} comment "left: unreachable"
    {gone} meta l4proto tcp counter reject with tcp reset comment "no VM on {tap}: reset"
    {gone} counter {unreachable} comment "no VM on {tap}: unreachable"
  }}
}}
"""


def create_namespace_table(
    namespace: str, name: str, veth: str, tap: str, external: str, guest: str
) -> None:
    """Create the table ``ip name`` inside ``namespace`` (see :func:`namespace_ruleset`)."""
    log.debug("%s: nft table ip %s: %s <-> %s", namespace, name, external, guest)
    ruleset = namespace_ruleset(name, veth, tap, external, guest)
    run_in_namespace(namespace, ["nft", "-f", "-"], input_text=ruleset)


def table_counters(name: str, family: str = FAMILY) -> dict[str, int]:
    """Packet counters of the rules of host table ``family name``, keyed by rule comment."""
    data = json.loads(_nft(["-j", "list", "table", family, name]))
    counters: dict[str, int] = {}
    for item in data.get("nftables", []):
        rule = item.get("rule")
        if not rule:
            continue
        for expr in rule.get("expr", []):
            if "counter" in expr:
                counters[rule.get("comment", str(rule.get("handle")))] = int(
                    expr["counter"]["packets"]
                )
    return counters
