"""The VM tier's fixtures: the blueprints (built once, cached by content), the host
network, QEMU machines, packages.

Everything here is real: the blueprint comes from Debian packages, the network from
``drafter-daemon``, VMs are QEMU processes; the tests run as root. Every fixture
removes what it made, also when the test fails. Every test below this directory gets
the ``vm`` marker (``pytest -m vm`` selects the tier, as does ``pytest tests/vm``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from drafter.blueprint.builder import Blueprint, BlueprintSpec, build
from drafter.vmm import MachineConfig, QemuMachine
from support.common import (
    CACHE,
    OUT,
    TEST_CIDR_BASE,
    TEST_PREFIX,
    TMP_PREFIX,
    command,
    run_command,
    stop_process,
)
from support.vms import TestNetwork, copy_package, ctrl_c, runner, wait_for_redis

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the whole session: no FUSE mount of a test remains (fails the run if so)."""
    yield
    mounts = [
        line.split()[1]
        for line in Path("/proc/mounts").read_text().splitlines()
        if " fuse" in line and TMP_PREFIX in line
    ]
    assert mounts == [], f"tests left FUSE mounts behind: {mounts}"


@pytest.fixture(scope="session")
def redis_blueprint() -> Blueprint:
    return build(BlueprintSpec(app="redis"), OUT / "test" / "blueprint-redis", CACHE)


@pytest.fixture(scope="session")
def postgresql_blueprint() -> Blueprint:
    return build(BlueprintSpec(app="postgresql"), OUT / "test" / "blueprint-postgresql", CACHE)


def start_daemon(state_dir: Path, prefix: str, count: int, cidr_base: int) -> subprocess.Popen:
    """Start drafter-daemon and wait for its ready line."""
    proc = subprocess.Popen(
        [
            command("drafter-daemon"),
            "--namespace-prefix",
            prefix,
            "--namespace-count",
            str(count),
            "--host-veth-cidr",
            f"10.{cidr_base}.0.0/24",
            "--namespace-veth-cidr",
            f"10.{cidr_base + 1}.0.0/24",
            "--state-dir",
            str(state_dir),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "ready" in line.lower():
            return proc
    stop_process(proc)
    raise RuntimeError("drafter-daemon did not become ready:\n" + "".join(lines))


@pytest.fixture(scope="session")
def network() -> Iterator[TestNetwork]:
    state_dir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "net-"))
    proc = start_daemon(state_dir, TEST_PREFIX, 4, TEST_CIDR_BASE)
    try:
        yield TestNetwork(state_dir, TEST_PREFIX, 4)
    finally:
        stop_process(proc)
        shutil.rmtree(state_dir, ignore_errors=True)


@dataclass
class MachineFactory:
    """Makes QEMU machines for one test and kills whatever is left at the end."""

    root: Path
    machines: list[QemuMachine] = field(default_factory=list)

    def __call__(
        self,
        blueprint: Blueprint,
        netns: str | None = None,
        memory_mib: int = 256,
        memory: Path | None = None,
        disk: Path | None = None,
    ) -> QemuMachine:
        run_dir = self.root / f"vm-{uuid.uuid4().hex[:8]}"
        run_dir.mkdir(parents=True)
        if disk is None:  # the VM writes to its disk: give it its own copy
            disk = self.root / f"disk-{uuid.uuid4().hex[:8]}"
            subprocess.run(["cp", "--sparse=always", str(blueprint.disk), str(disk)], check=True)
        config = MachineConfig(
            kernel=blueprint.kernel,
            initramfs=blueprint.initramfs,
            disk=disk,
            memory=memory or run_dir / "memory",
            memory_mib=memory_mib,
            netns=netns,
        )
        machine = QemuMachine(config, run_dir)
        self.machines.append(machine)
        return machine

    def cleanup(self) -> None:
        for m in self.machines:
            if m.process is not None and m.process.returncode is None:
                with contextlib.suppress(ProcessLookupError, ChildProcessError):
                    os.kill(m.process.pid, signal.SIGKILL)
                    os.waitpid(m.process.pid, 0)


@pytest.fixture
def machine_factory(workdir: Path) -> Iterator[Callable[..., QemuMachine]]:
    factory = MachineFactory(workdir)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="session")
def redis_package(redis_blueprint: Blueprint, network: TestNetwork) -> Iterator[Path]:
    """A packaged Redis VM (256 MiB), made once by drafter-packager."""
    if os.environ.get("DRAFTER_TEST_PACKAGE"):  # an outer session's (test_cleanup)
        yield Path(os.environ["DRAFTER_TEST_PACKAGE"])
        return
    path = OUT / "test" / "redis.drft"
    result = run_command(
        "drafter-packager",
        "--netns", network.name(0),
        "--memory-size", "256",
        "--kernel-path", str(redis_blueprint.kernel),
        "--initramfs-path", str(redis_blueprint.initramfs),
        "--disk-path", str(redis_blueprint.disk),
        "--package-output-path", str(path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    yield path


@pytest.fixture(scope="session")
def seeded_package(redis_package, network) -> Iterator[Path]:
    """The Redis package with one key written into it (through drafter-runner)."""
    directory = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "seeded-"))
    try:  # removed also when seeding fails
        package = copy_package(redis_package, directory)
        with runner(package, network.name(0)) as proc:
            assert wait_for_redis(network.info(0).external_address).set("from", "the package")
            ctrl_c(proc)
        yield package
    finally:
        shutil.rmtree(directory, ignore_errors=True)
