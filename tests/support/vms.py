"""Real VMs from the tests' side: the test network, our commands around a package
(packager, runner, registry, peer), Redis clients and a writer that follows a VM
through migrations. Everything here needs root and the VM fixtures of tests/vm."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from drafter.blueprint.builder import Blueprint
from drafter.network import NamespaceInfo, namespace_info
from support.common import command, run_command, stop_process
from support.net import free_port


@dataclass
class TestNetwork:
    """The namespaces drafter-daemon made for the session (the ``network`` fixture)."""

    __test__ = False  # not a test class, whatever its name

    state_dir: Path
    prefix: str
    count: int

    def name(self, index: int) -> str:
        """The name of namespace ``index``."""
        return f"{self.prefix}{index}"

    def info(self, index: int) -> NamespaceInfo:
        """The addresses of namespace ``index``."""
        return namespace_info(self.name(index), self.state_dir)


def copy_package(src: Path, dst_dir: Path) -> Path:
    """A sparse copy of the package ``src`` in ``dst_dir``."""
    dst = dst_dir / src.name
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def packager(
    blueprint: Blueprint, out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """drafter-packager over ``blueprint`` writing ``out``, run to its end."""
    return run_command(
        "drafter-packager",
        "--kernel-path", str(blueprint.kernel),
        "--initramfs-path", str(blueprint.initramfs),
        "--disk-path", str(blueprint.disk),
        "--package-output-path", str(out),
        *extra,
        env=env,
    )  # fmt: skip


def wait_for_redis(address: str, port: int = 6379, timeout: float = 60) -> redis.Redis:
    """A client of the Redis at ``address`` once it answers a PING."""
    client = redis.Redis(host=address, port=port, socket_timeout=10, socket_connect_timeout=2)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return client
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def runner(
    package: Path, netns: str, *extra: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """drafter-runner resuming ``package`` in ``netns``; stopped at the end."""
    proc = subprocess.Popen(
        [command("drafter-runner"), "--netns", netns, "--package-path", str(package), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        yield proc
    finally:
        stop_process(proc)  # Ctrl-C first: the runner removes its mount


def ctrl_c(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C a runner; it must exit 0 having written its snapshot."""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "snapshot" in out


def running(proc: subprocess.Popen[str], timeout: float = 180) -> None:
    """Wait for a runner's first line ("resumed PATH; ..."); its stderr if it never comes."""
    line: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or not line[0].startswith("resumed"):
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"the runner did not resume the VM: {line} {err[-3000:]}")


@contextlib.contextmanager
def console_on_failure(directory: Path) -> Iterator[None]:
    """On a failure, the tail of the guest consoles of the runners under ``directory``."""
    try:
        yield
    except BaseException:
        for log in directory.glob(".*.work/run/console.log"):
            print(f"\n--- {log} ---\n" + log.read_text(errors="replace")[-4000:])
        raise


@contextlib.contextmanager
def registry(
    package: Path | str, *extra: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """drafter-registry serving ``package`` (a file or an object's URL) on a free
    loopback port: (process, address)."""
    port = free_port()
    proc = subprocess.Popen(
        [command("drafter-registry"), "--package-path", str(package),
         "--laddr", f"127.0.0.1:{port}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving" in line, line + (proc.stderr.read() if proc.stderr else "")
        yield proc, f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


@contextlib.contextmanager
def peer(
    raddr: str,
    netns: str,
    workdir: Path,
    *extra: str,
    laddr: str = "",
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[str]]:
    """drafter-peer in ``netns`` starting (or migrating) the VM from ``raddr``."""
    proc = subprocess.Popen(
        [command("drafter-peer"), "--netns", netns, "--raddr", raddr, "--laddr", laddr,
         "--work-dir", str(workdir / "vms"), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        yield proc
    finally:
        stop_process(proc)  # Ctrl-C first: the peer removes its mount and cache


def wait_resumed(proc: subprocess.Popen[str]) -> str:
    """The peer's or runner's first line, which must say it resumed the VM."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "resumed the VM" in line, line + (proc.stderr.read() if proc.stderr else "")
    return line


def migrate(
    raddr: str, netns: str, workdir: Path, laddr: str, *extra: str
) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    """A peer that migrates (or starts) the VM from ``raddr`` and serves it on ``laddr``."""
    return peer(raddr, netns, workdir, *extra, laddr=laddr)


def finish_source(source: subprocess.Popen[str]) -> str:
    """Wait for a migration source to exit 0, saying the VM migrated away; its stdout."""
    out, err = source.communicate(timeout=180)
    assert source.returncode == 0, err
    assert "migrated away" in out, out
    return out


class Writer(threading.Thread):
    """Appends 1, 2, 3, ... to a Redis list, following the VM to wherever it runs.

    A write counts once Redis acknowledged it. After a failure the writer checks
    whether the write landed anyway; if it cannot tell yet, it retries, so a write the
    guest had received just before switch-over may land twice (at-least-once, as for
    any client that retries). Such values are recorded in ``retried``.
    """

    def __init__(self, addresses: list[str]) -> None:
        super().__init__(daemon=True)
        self.addresses = addresses
        self.acked: list[int] = []
        self.gaps: list[float] = []
        self.stop = threading.Event()
        self.errors = 0
        self.retried: set[int] = set()

    def client(self, address: str) -> redis.Redis:
        """A client that never retries by itself."""
        # No retries inside redis-py: a retried write must be visible to the check.
        return redis.Redis(
            host=address, socket_timeout=1, socket_connect_timeout=0.3, retry=Retry(NoBackoff(), 0)
        )

    def run(self) -> None:
        value = 1
        current = 0
        client = self.client(self.addresses[current])
        last_ack = time.monotonic()
        while not self.stop.is_set():
            try:
                client.rpush("log", value)
            except redis.RedisError:
                self.errors += 1
                self.retried.add(value)
                landed = self.find(value)
                if landed is None:
                    current = (current + 1) % len(self.addresses)
                    client = self.client(self.addresses[current])
                    continue
                client = landed
            now = time.monotonic()
            self.gaps.append(now - last_ack)
            last_ack = now
            self.acked.append(value)
            value += 1
            time.sleep(0.005)

    def find(self, value: int) -> redis.Redis | None:
        """The client of the VM if ``value`` is already its list's last element."""
        for address in self.addresses:
            client = self.client(address)
            try:
                if client.lindex("log", -1) == str(value).encode():
                    return client
            except redis.RedisError:
                continue
        return None


@contextlib.contextmanager
def writing(addresses: list[str]) -> Iterator[Writer]:
    """A :class:`Writer` running for the duration of the block."""
    writer = Writer(addresses)
    writer.start()
    try:
        yield writer
    finally:
        writer.stop.set()
        writer.join(30)


def check_no_loss(address: str, writer: Writer) -> None:
    """The VM at ``address`` holds every write ``writer`` had acknowledged, in order."""
    log = [int(x) for x in wait_for_redis(address).lrange("log", 0, -1)]
    assert writer.acked, "the writer never got an acknowledgement"
    writes: list[int] = []
    for value in log:
        if writes and value == writes[-1]:
            # Only a write the client sent again may appear twice, and only in a row.
            assert value in writer.retried, f"{value} appears twice but was sent once"
            continue
        writes.append(value)
    assert writes == sorted(set(writes)), "writes out of order"
    assert writes[: len(writer.acked)] == writer.acked, "acknowledged writes lost"
