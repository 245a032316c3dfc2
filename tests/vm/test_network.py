"""Host networking: drafter-daemon and drafter-forwarder as real processes, as root.

Every daemon gets a test-unique prefix, its own state directory and private CIDRs,
so it cannot collide with a user's daemon. No VM is needed: a "fake guest" namespace,
joined to the daemon's namespace by a veth and holding the guest address, stands in
for the VM behind tap0, so traffic really goes through the DNAT/SNAT rules.
Everything made here is removed in fixtures/finally blocks, also when a test fails.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from drafter.errors import DrafterError
from drafter.network import NetworkConfig, namespace_info
from drafter.network.config import plan_namespaces
from drafter.network.namespaces import in_namespace

BIN = Path(sys.executable).parent
DAEMON = str(BIN / "drafter-daemon")
FORWARDER = str(BIN / "drafter-forwarder")
GUEST = "172.100.100.2"
GATEWAY = "172.100.100.1"

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# -- helpers -------------------------------------------------------------------------------


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def ip_json(*argv: str) -> list[dict[str, Any]]:
    return json.loads(sh("ip", "-j", *argv).stdout or "[]")


def namespaces() -> set[str]:
    return {n["name"] for n in ip_json("netns", "list")}


def link_exists(name: str, netns: str | None = None) -> bool:
    cmd = ["ip", *(["-n", netns] if netns else []), "link", "show", name]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def nft_table_exists(name: str) -> bool:
    return sh("nft", "list", "table", "inet", name, check=False).returncode == 0


def nft_counters(table: str) -> dict[str, int]:
    data = json.loads(sh("nft", "-j", "list", "table", "inet", table).stdout)
    out = {}
    for item in data["nftables"]:
        rule = item.get("rule")
        for expr in rule.get("expr", []) if rule else []:
            if "counter" in expr:
                out[rule["comment"]] = expr["counter"]["packets"]
    return out


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Assert ``proc`` failed with exactly one line on stderr and no traceback."""
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@dataclass
class Daemon:
    """A drafter-daemon subprocess and what it printed."""

    proc: subprocess.Popen[str]
    config: NetworkConfig
    lines: list[str] = field(default_factory=list)
    _q: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def start_reader(self) -> None:
        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._q.put(line.rstrip("\n"))
            self._q.put(None)

        threading.Thread(target=read, daemon=True).start()

    def wait_for(self, word: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {word!r} line in {timeout}s: {self.lines}") from None
            if line is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"exited before {word!r}: {self.lines} {err}")
            self.lines.append(line)
            if word in line:
                return line

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    @property
    def plans(self) -> list[Any]:
        return plan_namespaces(self.config)


class Env:
    """A unique prefix, CIDRs and state directory, plus cleanup of anything left behind."""

    def __init__(self, tmp: Path) -> None:
        self.prefix = "dnt" + "".join(random.choices("abcdefghijkmnpqrstuvwxyz", k=4))
        third = random.randrange(16, 250, 2)
        self.host_cidr = f"10.231.{third}.0/24"
        self.ns_cidr = f"10.231.{third + 1}.0/24"
        self.state_dir = tmp / "state"
        self.daemons: list[Daemon] = []
        self.extra_namespaces: list[str] = []
        self.extra_links: list[str] = []

    def config(self, count: int = 2) -> NetworkConfig:
        return NetworkConfig(
            host_veth_cidr=self.host_cidr,
            namespace_veth_cidr=self.ns_cidr,
            namespace_prefix=self.prefix,
            namespace_count=count,
            state_dir=str(self.state_dir),
        )

    def args(self, count: int = 2) -> list[str]:
        return [
            "--namespace-prefix",
            self.prefix,
            "--namespace-count",
            str(count),
            "--host-veth-cidr",
            self.host_cidr,
            "--namespace-veth-cidr",
            self.ns_cidr,
            "--state-dir",
            str(self.state_dir),
        ]

    def start(self, count: int = 2, extra: list[str] | None = None) -> Daemon:
        proc = subprocess.Popen(
            [DAEMON, *self.args(count), *(extra or [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        d = Daemon(proc, self.config(count))
        self.daemons.append(d)
        d.start_reader()
        d.wait_for("ready")
        return d

    def run(
        self, *argv: str, count: int = 2, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, DAEMON, *self.args(count)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def leftovers(self) -> list[str]:
        left = [n for n in namespaces() if n.startswith(self.prefix)]
        links = ip_json("link", "show")
        left += [x["ifname"] for x in links if x["ifname"].startswith(self.prefix)]
        if nft_table_exists(f"drafter_{self.prefix}"):
            left.append(f"nft table drafter_{self.prefix}")
        return left

    def cleanup(self) -> None:
        for d in self.daemons:
            with contextlib.suppress(Exception):
                d.stop(timeout=10)
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
        for ns in [*self.extra_namespaces, *sorted(namespaces())]:
            if ns.startswith(self.prefix) or ns in self.extra_namespaces:
                sh("ip", "netns", "del", ns, check=False)
        for link in ip_json("link", "show"):
            if link["ifname"].startswith(self.prefix):
                sh("ip", "link", "del", link["ifname"], check=False)
        sh("nft", "delete", "table", "inet", f"drafter_{self.prefix}", check=False)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.cleanup()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Env, Daemon]]:
    """One daemon with two namespaces for the tests that do not stop it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    e = Env(tmp_path_factory.mktemp("net"))
    try:
        yield e, e.start(count=2)
    finally:
        e.cleanup()


class Server:
    """A TCP (or UDP) echo server on ``host:port`` inside namespace ``netns``."""

    def __init__(self, netns: str, host: str, port: int = 0, udp: bool = False) -> None:
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        with in_namespace(netns):
            self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.peers: list[str] = []
        if not udp:
            self.sock.listen()
        target = self._udp if udp else self._tcp
        threading.Thread(target=target, daemon=True).start()

    def _tcp(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer[0])
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def _udp(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65536)
            except OSError:
                return
            if peer is None:  # shut down
                return
            self.peers.append(peer[0])
            self.sock.sendto(data, peer)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@contextlib.contextmanager
def fake_guest(env: Env, netns: str) -> Iterator[str]:
    """A namespace standing in for the VM behind ``netns``'s tap0: it holds the guest
    address on a veth whose other end is in ``netns`` (with a /32 route to the guest).
    Yields the guest namespace's name."""
    guest = f"{netns}g"
    env.extra_namespaces.append(guest)
    try:
        sh("ip", "netns", "add", guest)
        veth = ["gst0", "netns", netns, "type", "veth", "peer", "name", "eth0", "netns", guest]
        sh("ip", "link", "add", *veth)
        sh("ip", "-n", netns, "link", "set", "gst0", "up")
        sh("ip", "-n", netns, "route", "add", f"{GUEST}/32", "dev", "gst0")
        sh("ip", "-n", guest, "link", "set", "lo", "up")
        sh("ip", "-n", guest, "addr", "add", f"{GUEST}/30", "dev", "eth0")
        sh("ip", "-n", guest, "link", "set", "eth0", "up")
        sh("ip", "-n", guest, "route", "add", "default", "via", GATEWAY)
        yield guest
    finally:
        if link_exists("gst0", netns):
            sh("ip", "-n", netns, "link", "del", "gst0", check=False)
        sh("ip", "netns", "del", guest, check=False)


def echo_roundtrip(
    addr: tuple[str, int], payload: bytes, netns: str | None = None, timeout: float = 5
) -> bytes:
    if netns:
        with in_namespace(netns):
            s = socket.socket()
    else:
        s = socket.socket()
    with s:
        s.settimeout(timeout)
        s.connect(addr)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def wait_until(pred: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# The pure library tests (no root needed) are in tests/unit/test_network_config.py and
# tests/unit/test_port_forwards.py.


# -- the daemon ------------------------------------------------------------------------------


@root_only
def test_daemon_creates_namespaces(shared: tuple[Env, Daemon]) -> None:
    env, d = shared
    table = f"drafter_{env.prefix}"
    assert nft_table_exists(table)
    state = json.loads((env.state_dir / f"daemon-{env.prefix}.json").read_text())
    assert state["pid"] == d.proc.pid
    assert [n["namespace"] for n in state["namespaces"]] == [f"{env.prefix}0", f"{env.prefix}1"]
    for plan in d.plans:
        ns = plan.namespace
        assert f"{ns}: VM reachable from the host at {plan.external_address}" in "\n".join(d.lines)
        assert ns in namespaces()
        (tap,) = ip_json("-n", ns, "-d", "addr", "show", "tap0")
        assert tap["linkinfo"]["info_kind"] == "tun"
        assert tap["linkinfo"]["info_data"]["type"] == "tap"
        assert tap["linkinfo"]["info_data"]["persist"] is True
        assert "UP" in tap["flags"]
        assert tap["address"] == "02:0e:d9:fd:68:3d"
        assert [
            (a["local"], a["prefixlen"]) for a in tap["addr_info"] if a["family"] == "inet"
        ] == [(GATEWAY, 30)]
        (lo,) = ip_json("-n", ns, "link", "show", "lo")
        assert "UP" in lo["flags"]
        (veth,) = ip_json("-n", ns, "addr", "show", "veth0")
        assert {
            (a["local"], a["prefixlen"]) for a in veth["addr_info"] if a["family"] == "inet"
        } == {
            (plan.namespace_address, 30),
            (plan.external_address, 32),
        }
        (host,) = ip_json("addr", "show", plan.host_veth)
        assert [
            (a["local"], a["prefixlen"]) for a in host["addr_info"] if a["family"] == "inet"
        ] == [(plan.host_address, 30)]
        (route,) = ip_json("route", "show", f"{plan.external_address}/32")
        assert route["gateway"] == plan.namespace_address
        assert route["dev"] == plan.host_veth
        fwd = sh("ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.ip_forward").stdout
        assert fwd.strip() == "1"
        rules = sh("ip", "netns", "exec", ns, "nft", "list", "table", "ip", table).stdout
        assert f"dnat to {GUEST}" in rules
        assert f"snat to {plan.external_address}" in rules
        assert "reject with tcp reset" in rules  # fail fast: see test_follow.py
        for key, value in (
            ("net.ipv4.conf.tap0.ignore_routes_with_linkdown", "1"),
            ("net.netfilter.nf_conntrack_tcp_loose", "1"),
            ("net.netfilter.nf_conntrack_tcp_be_liberal", "1"),
        ):
            got = sh("ip", "netns", "exec", ns, "sysctl", "-n", key).stdout
            assert got.strip() == value, key
        info = json.loads((env.state_dir / "netns" / f"{ns}.json").read_text())
        assert info == {
            "namespace": ns,
            "external_address": plan.external_address,
            "host_veth": plan.host_veth,
            "host_address": plan.host_address,
            "namespace_address": plan.namespace_address,
            "guest_address": GUEST,
            "daemon_pid": d.proc.pid,
            "nft_table": table,
            "namespace_veth": "veth0",
        }
        assert namespace_info(ns, env.state_dir).external_address == plan.external_address
    with pytest.raises(DrafterError, match="not managed"):
        namespace_info(f"{env.prefix}9", env.state_dir)


@root_only
def test_host_reaches_guest_through_external_address(shared: tuple[Env, Daemon]) -> None:
    env, d = shared
    plan = d.plans[0]
    with fake_guest(env, plan.namespace) as guest:
        tcp = Server(guest, GUEST)
        udp = Server(guest, GUEST, udp=True)
        host_listener = socket.socket()
        try:
            # host -> external address -> DNAT -> guest (tcp)
            assert echo_roundtrip((plan.external_address, tcp.port), b"hello vm") == b"hello vm"
            assert tcp.peers == [plan.host_address]
            # ... and udp
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(5)
                s.sendto(b"ping", (plan.external_address, udp.port))
                assert s.recvfrom(100)[0] == b"ping"
            # guest -> host: nothing reaches the host's own services (here one on the
            # host side of the veth), however it listens
            host_listener.bind((plan.host_address, 0))
            host_listener.listen()
            port = host_listener.getsockname()[1]
            table = f"drafter_{env.prefix}"
            before = nft_counters(table)["no namespace reaches the host"]
            with in_namespace(guest):
                out = socket.socket()
            with out, pytest.raises(OSError):
                out.settimeout(1)
                out.connect((plan.host_address, port))
            assert nft_counters(table)["no namespace reaches the host"] > before
        finally:
            host_listener.close()
            tcp.close()
            udp.close()


@root_only
def test_namespaces_cannot_reach_each_other(shared: tuple[Env, Daemon]) -> None:
    env, d = shared
    p0, p1 = d.plans
    table = f"drafter_{env.prefix}"
    saved: dict[str, str] = {}
    with fake_guest(env, p1.namespace) as guest1:
        server = Server(guest1, GUEST)
        try:
            # The path to ns1's VM works from the host ...
            assert echo_roundtrip((p1.external_address, server.port), b"x") == b"x"
            # ... and the host would forward between the veths (only ours, only here), so
            # only the daemon's isolation rule stands between ns0 and ns1.
            for plan in (p0, p1):
                knob = Path(f"/proc/sys/net/ipv4/conf/{plan.host_veth}/forwarding")
                saved[str(knob)] = knob.read_text()
                knob.write_text("1")
            before = nft_counters(table)["isolation"]
            with pytest.raises(OSError):
                echo_roundtrip((p1.external_address, server.port), b"y", p0.namespace, timeout=1)
            assert nft_counters(table)["isolation"] > before
            assert len(server.peers) == 1
        finally:
            for path, value in saved.items():
                with contextlib.suppress(OSError):
                    Path(path).write_text(value)
            server.close()


@root_only
def test_sigint_removes_everything(env: Env) -> None:
    d = env.start(count=2)
    assert len(env.leftovers()) == 5  # 2 namespaces, 2 veths, 1 table
    assert d.stop(signal.SIGINT) == 0
    assert env.leftovers() == []
    assert not (env.state_dir / f"daemon-{env.prefix}.json").exists()
    assert not (env.state_dir / f"daemon-{env.prefix}.lock").exists()
    assert not list(env.state_dir.rglob("*.json"))


@root_only
def test_sigterm_removes_everything(env: Env) -> None:
    d = env.start(count=1)
    assert d.stop(signal.SIGTERM) == 0
    assert env.leftovers() == []


@root_only
def test_restart_after_kill9(env: Env) -> None:
    first = env.start(count=2)
    first.stop(signal.SIGKILL)
    # What the killed daemon made is still there, and its files point at a dead pid.
    assert len(env.leftovers()) == 5
    with pytest.raises(DrafterError, match="not running"):
        namespace_info(f"{env.prefix}0", env.state_dir)
    second = env.start(count=2)
    state = json.loads((env.state_dir / f"daemon-{env.prefix}.json").read_text())
    assert state["pid"] == second.proc.pid
    assert namespace_info(f"{env.prefix}1", env.state_dir).daemon_pid == second.proc.pid
    assert len(env.leftovers()) == 5
    assert second.stop() == 0
    assert env.leftovers() == []


@root_only
def test_second_daemon_while_first_runs(env: Env) -> None:
    first = env.start(count=1)
    proc = env.run(count=1)
    assert "already running" in one_line_error(proc)
    assert first.proc.poll() is None
    assert namespace_info(f"{env.prefix}0", env.state_dir).daemon_pid == first.proc.pid


@root_only
def test_bad_host_interface(env: Env) -> None:
    proc = subprocess.run(
        [DAEMON, *env.args(1), "--host-interface", "nosuchif0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "nosuchif0" in one_line_error(proc)
    assert env.leftovers() == []


@root_only
def test_not_root(env: Env) -> None:
    proc = env.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", count=1)
    assert "root" in one_line_error(proc)
    assert env.leftovers() == []


@root_only
def test_conflicting_namespace(env: Env) -> None:
    ns = f"{env.prefix}1"
    sh("ip", "netns", "add", ns)
    proc = env.run(count=2)
    assert ns in one_line_error(proc)
    # The foreign namespace is left alone; nothing of ours is left behind.
    assert env.leftovers() == [ns]


@root_only
def test_address_already_in_use(env: Env) -> None:
    dummy = f"{env.prefix}d"
    plan = plan_namespaces(env.config(2))[1]
    sh("ip", "link", "add", dummy, "type", "veth", "peer", "name", f"{env.prefix}e")
    sh("ip", "addr", "add", f"{plan.external_address}/32", "dev", dummy)
    proc = env.run(count=2)
    assert "already in use" in one_line_error(proc)
    assert sorted(env.leftovers()) == [dummy, f"{env.prefix}e"]


# -- the forwarder ---------------------------------------------------------------------------


def start_forwarder(spec: list[dict[str, str]], state_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [FORWARDER, "--port-forwards", json.dumps(spec), "--state-dir", str(state_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@root_only
def test_forwarder_carries_tcp_session(shared: tuple[Env, Daemon]) -> None:
    env, d = shared
    p0, p1 = d.plans
    with fake_guest(env, p0.namespace) as g0, fake_guest(env, p1.namespace) as g1:
        s0, s1 = Server(g0, GUEST), Server(g1, GUEST)
        spec = [
            {
                "netns": p.namespace,
                "internalPort": str(s.port),
                "protocol": "tcp",
                "externalAddr": "127.0.0.1:0",
            }
            for p, s in ((p0, s0), (p1, s1))
        ]
        fwd = start_forwarder(spec, env.state_dir)
        try:
            assert fwd.stdout is not None
            addrs = []
            for _ in spec:
                line = fwd.stdout.readline()
                addrs.append(line.split()[0])
            assert fwd.stdout.readline().strip() == "ready"
            for addr, s in zip(addrs, (s0, s1), strict=True):
                host, port = addr.rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=5) as c:
                    c.settimeout(5)
                    for i in range(5):  # one session, several exchanges
                        msg = f"message {i} ".encode() * 100
                        c.sendall(msg)
                        got = b""
                        while len(got) < len(msg):
                            got += c.recv(65536)
                        assert got == msg
                assert wait_until(functools.partial(lambda srv: len(srv.peers) == 1, s))
            fwd.send_signal(signal.SIGINT)
            assert fwd.wait(timeout=10) == 0
        finally:
            if fwd.poll() is None:
                fwd.kill()
                fwd.wait()
            s0.close()
            s1.close()


@root_only
def test_forwarder_errors(shared: tuple[Env, Daemon], tmp_path: Path) -> None:
    env, d = shared
    ns = d.plans[0].namespace
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = f"127.0.0.1:{taken.getsockname()[1]}"

    def run(spec: str, state_dir: Path = env.state_dir) -> str:
        proc = subprocess.run(
            [FORWARDER, "--port-forwards", spec, "--state-dir", str(state_dir)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return one_line_error(proc)

    def spec(netns: str = ns, protocol: str = "tcp", addr: str = "127.0.0.1:0") -> str:
        return json.dumps(
            [{"netns": netns, "internalPort": "80", "protocol": protocol, "externalAddr": addr}]
        )

    try:
        assert "JSON" in run("[{not json")
        assert "not managed" in run(spec(netns=f"{env.prefix}9"))
        assert "not managed" in run(spec(), state_dir=tmp_path)
        assert "tcp" in run(spec(protocol="udp"))
        assert "address already in use" in run(spec(addr=busy))
    finally:
        taken.close()
