"""Clients follow the VM (docs/networking.md, "Following a VM"): the address a VM left
answers with resets, a stable address moves with the VM, and connections to it survive
live migrations between namespaces of this host.

The clients are nobody's here: pgbench (postgresql-client), redis-benchmark
(redis-tools), and redis-py holding one connection with no reconnect logic at all.
Each test prints its figures (``pytest -s``) for the record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from drafter.network import carrier
from drafter.network.namespaces import in_namespace
from support.common import (
    TEST_CIDR_BASE,
    TEST_PREFIX,
    TMP_PREFIX,
    assert_one_line_error,
    run_command,
)
from support.net import free_port
from support.vms import (
    copy_package,
    ctrl_c,
    finish_source,
    peer,
    registry,
    runner,
    wait_for_redis,
    wait_resumed,
)

# Stable addresses: apart from every daemon's CIDRs (10.{base}.0.0/24, 10.{base+1}.0.0/24)
# and from other sessions (they use another base).
STABLE_NET = f"10.{TEST_CIDR_BASE}.200"
PG_SECONDS = 15  # pgbench -T
PG_CLIENTS = 4


def stable(n: int) -> str:
    return f"{STABLE_NET}.{n}"


def follow_flags(network, address: str | None = None) -> list[str]:
    flags = ["--state-dir", str(network.state_dir)]
    return flags + (["--stable-address", address] if address else [])


# -- PostgreSQL ----------------------------------------------------------------------------


def psql(host: str, sql: str, timeout: float = 30) -> str:
    result = subprocess.run(
        ["psql", "-h", host, "-U", "postgres", "-At", "-F", ",", "-c", sql, "postgres"],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def wait_for_postgres(host: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        probe = subprocess.run(["pg_isready", "-h", host, "-t", "2"], capture_output=True)
        if probe.returncode == 0:
            return
        assert time.monotonic() < deadline, f"PostgreSQL at {host} never answered"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def pgbench_package(postgresql_blueprint, network) -> Iterator[Path]:
    """A packaged PostgreSQL VM (384 MiB) holding pgbench's tables (scale 1)."""
    directory = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "pgbench-"))
    path = directory / "postgresql.drft"
    try:
        result = run_command(
            "drafter-packager",
            "--netns", network.name(3),
            "--memory-size", "384",
            "--kernel-path", str(postgresql_blueprint.kernel),
            "--initramfs-path", str(postgresql_blueprint.initramfs),
            "--disk-path", str(postgresql_blueprint.disk),
            "--package-output-path", str(path),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        address = network.info(3).external_address
        with runner(path, network.name(3), "--state-dir", str(network.state_dir)) as proc:
            wait_for_postgres(address)
            init = ["pgbench", "-i", "-s", "1", "-q", "-h", address, "-U", "postgres", "postgres"]
            subprocess.run(init, capture_output=True, check=True, timeout=300)
            psql(address, "CHECKPOINT")
            ctrl_c(proc)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class PgbenchRun:
    seconds: float  # wall time from start to exit
    returncode: int
    processed: int
    failed: int
    aborted: int
    idle_seconds: int  # progress intervals (-P 1) with 0 tps
    longest_s: float  # the longest transaction a client waited for (pgbench -l)
    ended_at: float
    stderr: str


def pgbench(host: str, logs: Path) -> tuple[subprocess.Popen[str], float]:
    argv = ["pgbench", "-h", host, "-U", "postgres", "-n", "-c", str(PG_CLIENTS),
            "-j", "2", "-T", str(PG_SECONDS), "-P", "1", "-l", f"--log-prefix={logs}",
            "postgres"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, time.monotonic()


def pgbench_result(proc: subprocess.Popen[str], started: float, logs: Path) -> PgbenchRun:
    # Ends within -T plus a few seconds, or the test fails (it never hangs).
    out, err = proc.communicate(timeout=PG_SECONDS + 30)
    ended = time.monotonic()

    def number(pattern: str) -> int:
        found = re.search(pattern, out)
        return int(found.group(1)) if found else 0

    progress = re.findall(r"progress: [\d.]+ s, ([\d.]+) tps", err)
    # Per transaction: client, number, latency (us), script, epoch s, us.
    latencies = [
        int(line.split()[2])
        for log in logs.parent.glob(f"{logs.name}.*")
        for line in log.read_text().splitlines()
        if len(line.split()) >= 3
    ]
    return PgbenchRun(
        seconds=ended - started,
        returncode=proc.returncode,
        processed=number(r"number of transactions actually processed: (\d+)"),
        failed=number(r"number of failed transactions: (\d+)"),
        aborted=len(re.findall(r"client \d+ aborted", err)),
        idle_seconds=sum(1 for tps in progress if float(tps) == 0.0),
        longest_s=max(latencies, default=0) / 1e6,
        ended_at=ended,
        stderr=err,
    )


def check_ledger(host: str, run: PgbenchRun) -> int:
    """pgbench's balance invariant, and a history row for every processed transaction;
    returns the number of history rows."""
    row = psql(host, "SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
               "(SELECT sum(bbalance) FROM pgbench_branches), "
               "(SELECT sum(tbalance) FROM pgbench_tellers), "
               "(SELECT coalesce(sum(delta), 0) FROM pgbench_history), "
               "(SELECT count(*) FROM pgbench_history)")  # fmt: skip
    accounts, branches, tellers, history, rows = (int(x) for x in row.split(","))
    assert accounts == branches == tellers == history, row
    # A transaction in flight when a client was cut may have committed unseen.
    assert run.processed <= rows <= run.processed + PG_CLIENTS, (row, run)
    return rows


def pgbench_across_a_migration(
    package: Path, network, workdir: Path, address: str | None
) -> tuple[PgbenchRun, float, int]:
    """pgbench -T against the VM of a peer in ns0 (at ``address``, else at ns0's own
    address) while it migrates to ns1; returns the run, when the destination resumed
    and the history rows."""
    flags = follow_flags(network, address)
    target = address or network.info(0).external_address
    with registry(package) as (_, raddr), contextlib.ExitStack() as stack:
        port = free_port()
        source = stack.enter_context(peer(raddr, network.name(0), workdir, *flags,
                                          laddr=f"127.0.0.1:{port}"))  # fmt: skip
        wait_resumed(source)
        wait_for_postgres(target)
        logs = workdir / "pgbench"
        proc, started = pgbench(target, logs)
        stack.callback(proc.kill)
        time.sleep(2)
        # Post-copy: the switch-over comes within seconds even on a loaded machine, so
        # it falls inside -T (what follows the clients does not depend on the mode).
        dest = stack.enter_context(peer(f"127.0.0.1:{port}", network.name(1), workdir, *flags,
                                        "--precopy-rounds", "0"))  # fmt: skip
        wait_resumed(dest)
        resumed = time.monotonic()
        run = pgbench_result(proc, started, logs)
        finish_source(source)
        rows = check_ledger(network.info(1).external_address, run)
    return run, resumed, rows


def test_pgbench_at_the_address_the_vm_left_ends_at_once(pgbench_package, network, workdir) -> None:
    run, resumed, rows = pgbench_across_a_migration(pgbench_package, network, workdir, None)
    after = run.ended_at - resumed
    print(f"\npgbench at the old address: ended after {run.seconds:.1f}s (-T {PG_SECONDS}), "
          f"{after:+.1f}s from the destination's resume; aborted clients {run.aborted}, "
          f"processed {run.processed}, history rows {rows}, invariant ok")  # fmt: skip
    assert run.aborted > 0, run.stderr  # cut, not hanging: every client was connected there
    assert run.seconds <= PG_SECONDS + 5
    assert after < 3, "the clients were cut long after the VM left"


def test_pgbench_at_the_stable_address_sees_a_pause_not_an_error(
    pgbench_package, network, workdir
) -> None:
    run, resumed, rows = pgbench_across_a_migration(pgbench_package, network, workdir, stable(1))
    print(f"\npgbench at the stable address: ended after {run.seconds:.1f}s (-T {PG_SECONDS}), "
          f"aborted {run.aborted}, failed {run.failed}, processed {run.processed}, "
          f"history rows {rows}, seconds with 0 tps {run.idle_seconds}, longest "
          f"transaction {run.longest_s:.2f}s")  # fmt: skip
    assert resumed < run.ended_at - 1, "the migration did not happen during the run"
    assert run.returncode == 0, run.stderr
    assert (run.aborted, run.failed) == (0, 0), run.stderr
    assert run.seconds <= PG_SECONDS + 5


# -- Redis -----------------------------------------------------------------------------------


class OneConnection(threading.Thread):
    """INCR over one TCP connection to ``host``, no reconnect: stops at the first error."""

    def __init__(self, host: str) -> None:
        super().__init__(daemon=True)
        self.answered: list[float] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.client = redis.Redis(
            host=host, socket_timeout=60, socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 0), single_connection_client=True,
        )  # fmt: skip
        self.client_id = self.client.client_id()
        self.local_port = self.port()

    def port(self) -> int:
        return self.client.connection._sock.getsockname()[1]

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.client.incr("requests")
            except BaseException as e:
                self.error = e
                return
            self.answered.append(time.monotonic())
            time.sleep(0.01)

    def pause_around(self, start: float, end: float) -> float:
        """The longest wait for an answer between ``start`` and ``end``."""
        times = [t for t in self.answered if start <= t <= end]
        if not times:
            return end - start
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return max([times[0] - start, *gaps])


def test_one_connection_survives_a_chain_of_three_migrations(
    seeded_package, network, workdir
) -> None:
    address = stable(2)
    flags = follow_flags(network, address)
    hops = [0, 1, 2, 0]
    pauses = []
    with registry(seeded_package) as (_, raddr), contextlib.ExitStack() as stack:
        ports = [free_port() for _ in hops]
        source = stack.enter_context(peer(raddr, network.name(0), workdir, *flags,
                                          laddr=f"127.0.0.1:{ports[0]}"))  # fmt: skip
        wait_resumed(source)
        wait_for_redis(address).set("requests", 0)
        holder = OneConnection(address)
        holder.start()
        stack.callback(holder.stop.set)
        time.sleep(1)
        for hop in range(1, len(hops)):
            began = time.monotonic()
            dest = stack.enter_context(
                peer(
                    f"127.0.0.1:{ports[hop - 1]}",
                    network.name(hops[hop]),
                    workdir,
                    *flags,
                    laddr=f"127.0.0.1:{ports[hop]}",
                )  # fmt: skip
            )
            wait_resumed(dest)
            time.sleep(2)
            assert holder.error is None, f"hop {hop}: {holder.error!r}"
            pauses.append(holder.pause_around(began, time.monotonic()))
            finish_source(source)
            source = dest
        holder.stop.set()
        holder.join(70)
        survived = holder.error is None and holder.client.client_id() == holder.client_id
        same_port = holder.port() == holder.local_port
        counted = int(holder.client.get("requests") or 0)
        print(f"\none connection through {len(hops) - 1} migrations: {len(holder.answered)} "
              f"requests answered, connection survived: {survived}, client-seen pause per "
              f"hop: {', '.join(f'{p:.2f}s' for p in pauses)}")  # fmt: skip
        assert holder.error is None, repr(holder.error)
        assert survived and same_port
        assert counted == len(holder.answered)
        stack.close()
    stopped_and_clean(network, address)


def test_redis_benchmark_at_the_stable_address_across_a_migration(
    seeded_package, network, workdir
) -> None:
    address = stable(3)
    flags = follow_flags(network, address)
    with registry(seeded_package) as (_, raddr), contextlib.ExitStack() as stack:
        port = free_port()
        source = stack.enter_context(peer(raddr, network.name(2), workdir, *flags,
                                          laddr=f"127.0.0.1:{port}"))  # fmt: skip
        wait_resumed(source)
        wait_for_redis(address)
        # The address is this VM's while it runs: another VM cannot have it.
        taken = run_command("drafter-runner", "--netns", network.name(3), "--package-path",
                            str(seeded_package), *flags, timeout=60)  # fmt: skip
        assert_one_line_error(taken, "already in use by the VM of pid")
        # Enough requests for about 20 s at the rate measured now: spans the migration
        # (default pre-copy, which takes longer on a loaded machine).
        bench = ["redis-benchmark", "-h", address, "-c", "4", "-t", "set,get", "-q"]
        began = time.monotonic()
        subprocess.run([*bench, "-n", "2000"], capture_output=True, check=True, timeout=60)
        rate = 4000 / (time.monotonic() - began)
        # Per test (set, get); capped: after the resume the guest is slower (post-copy,
        # the background pull), on a loaded machine several times so.
        requests = min(int(rate * 10), 15000)
        proc = subprocess.Popen([*bench, "-n", str(requests)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        stack.callback(proc.kill)
        time.sleep(2)
        dest = stack.enter_context(peer(f"127.0.0.1:{port}", network.name(3), workdir, *flags))
        wait_resumed(dest)
        resumed = time.monotonic()
        out, _ = proc.communicate(timeout=300)
        ended = time.monotonic()
        finish_source(source)
        errors = [ln for ln in out.splitlines() if "error" in ln.lower()]
        print(f"\nredis-benchmark -n {requests} at the stable address: exit {proc.returncode}, "
              f"errors {len(errors)} {errors[:3]}, ended {ended - resumed:.1f}s after the "
              f"destination resumed: {out.strip().splitlines()[-2:]}")  # fmt: skip
        assert resumed < ended, "the migration did not happen during the run"
        assert proc.returncode == 0, out
        assert errors == [], out


def stopped_and_clean(network, address: str) -> None:
    """After the VM of ``address`` stopped for good: the address is unreachable (a
    connection fails at once, nothing goes out by the default route), its record says
    so, and no namespace keeps a drafter_follow table."""
    shown = subprocess.run(["ip", "-j", "route", "show", f"{address}/32"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    routes = json.loads(shown.stdout)
    assert [r.get("type") for r in routes] == ["unreachable"], routes
    record = json.loads((network.state_dir / "follow" / f"{address}.json").read_text())
    assert record["stopped"] and record["pid"] == 0, record
    for i in range(network.count):
        tables = subprocess.run(["ip", "netns", "exec", network.name(i), "nft", "list", "tables"],
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "drafter_follow" not in tables, network.name(i)
    started = time.monotonic()
    with pytest.raises(OSError, match="No route to host"), socket.socket() as s:
        s.settimeout(10)
        s.connect((address, 6379))
    assert time.monotonic() - started < 1


def test_runner_holds_a_stable_address_and_gives_it_back(redis_package, network, workdir) -> None:
    address = stable(4)
    package = copy_package(redis_package, workdir)
    with runner(package, network.name(3), *follow_flags(network, address)) as proc:
        client = redis.Redis(host=address, socket_timeout=10, retry=Retry(NoBackoff(), 0))
        wait_for_redis(address)
        assert client.set("via", "the stable address")
        assert wait_for_redis(network.info(3).external_address).get("via")
        ctrl_c(proc)
        # The runner cut the connection before it let go of the address.
        with pytest.raises(redis.ConnectionError):
            client.ping()
    stopped_and_clean(network, address)
    with pytest.raises(ConnectionRefusedError), socket.socket() as s:
        s.settimeout(10)
        s.connect((network.info(3).external_address, 6379))
    # The next VM takes the stopped address over.
    with runner(package, network.name(2), *follow_flags(network, address)) as proc:
        assert wait_for_redis(address).get("via") == b"the stable address"
        ctrl_c(proc)
    stopped_and_clean(network, address)


# -- the gate and bad input -----------------------------------------------------------------


def test_the_daemon_cuts_connections_when_a_tap_loses_its_vm(monkeypatch) -> None:
    """What drafter-daemon does when a VM's process is killed: QEMU lets go of the tap
    (here: this test, holding the tap as QEMU would) and the carrier watch cuts the
    host's connections to the namespace's address at once."""
    namespace = f"{TEST_PREFIX}w{os.getpid() % 10000}"
    cut: list[tuple[str, float]] = []
    monkeypatch.setattr(carrier, "cut_connections", lambda a: cut.append((a, time.monotonic())))
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    watch = None
    try:
        ip = ["ip", "-n", namespace]
        subprocess.run([*ip, "tuntap", "add", "tap0", "mode", "tap"], check=True)
        subprocess.run([*ip, "link", "set", "tap0", "up"], check=True)
        with in_namespace(namespace):
            tap = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(tap, 0x400454CA, struct.pack("16sH", b"tap0", 0x0002 | 0x1000))  # TUNSETIFF
        watch = carrier.CarrierWatch({namespace: ("tap0", "192.0.2.77")})
        watch.start()
        time.sleep(0.3)
        assert cut == []
        let_go = time.monotonic()
        os.close(tap)
        deadline = let_go + 5
        while not cut and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cut and cut[0][0] == "192.0.2.77"
        assert cut[0][1] - let_go < 1
    finally:
        if watch is not None:
            watch.stop()
        subprocess.run(["ip", "netns", "del", namespace], check=False)


def test_an_address_without_a_vm_resets_at_once(network) -> None:
    # No VM runs in the last namespace between tests: the connection is refused (a
    # reset), not left to time out.
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError), socket.socket() as s:
        s.settimeout(10)
        s.connect((network.info(3).external_address, 6379))
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    ("address", "needle"),
    [
        ("nope", "is not an IPv4 address"),
        ("127.0.0.9", "not valid on this host"),
        ("host", "already in use on host interface"),  # the host side of a veth
        ("inside", "not valid on this host"),  # inside the /30 of another namespace's veth
    ],
)
def test_a_bad_stable_address_gets_one_line(
    redis_package, network, workdir, address: str, needle: str
) -> None:
    if address == "host":
        address = network.info(1).host_address
    elif address == "inside":
        address = network.info(1).namespace_address
    for cmd, where in (
        ("drafter-runner", ["--package-path", str(redis_package)]),
        ("drafter-peer", ["--raddr", "127.0.0.1:1"]),  # checked before it connects
    ):
        result = run_command(cmd, "--netns", network.name(3), *where,
                             *follow_flags(network, address), timeout=60)  # fmt: skip
        assert_one_line_error(result, needle)


def test_a_stable_address_is_unreachable_until_its_vm_runs(network) -> None:
    """Before a VM first takes its stable address, connecting to it fails at once on
    this host: with no route of its own the address would go out by the default route."""
    import errno

    from drafter.network.follow import Follower, handover_file

    address = stable(9)
    follower = Follower(network.name(2), str(network.state_dir), address)
    follower.prepare()
    try:
        shown = subprocess.run(["ip", "route", "show", f"{address}/32"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert shown.startswith("unreachable"), shown
        with socket.socket() as s, pytest.raises(OSError) as refused:
            s.settimeout(2)
            s.connect((address, 6379))
        assert refused.value.errno == errno.EHOSTUNREACH, refused.value
    finally:
        follower.release()
        subprocess.run(["ip", "route", "del", f"{address}/32"], capture_output=True)
        handover_file(network.state_dir, address).unlink(missing_ok=True)
