"""The seed's "On a Workstation" commands, verbatim (flags and order), on one host.

Only the namespace names differ (the tests' own instead of ark0/ark1). The registry
listens on the seed's addresses (:1337, and :1600-:1604 for the per-resource remote
addresses); a peer started without a remote address migrates the VM served on this
host here and takes over the serving address once the source has left.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from support.common import command, dial_as_nobody, stop_process
from support.vms import wait_for_redis, wait_resumed


@contextlib.contextmanager
def started(workdir: Path, *argv: str) -> Iterator[subprocess.Popen]:
    """One of our commands as a user types it, run from ``workdir`` (its out/ is there)."""
    proc = subprocess.Popen(
        [command(argv[0]), *argv[1:]],
        cwd=workdir,
        stdin=subprocess.PIPE,  # --enable-input reads it; nothing is typed
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        stop_process(proc)


def serving(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def wait_until_serving(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not serving(port):
        assert time.monotonic() < deadline, f"nothing serves on port {port}"
        time.sleep(0.05)


def exited_after_migration(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "migrated away" in out, out


def test_the_seeds_workstation_commands_as_written(seeded_package, network, workdir) -> None:
    ark0, ark1 = network.name(0), network.name(1)
    for port in (1337, 1338, 1600, 1601, 1602, 1603, 1604):
        assert not serving(port), f"port {port} is taken on this host; the test needs it"
    package = workdir / "out" / "redis.drft"
    package.parent.mkdir()
    package.symlink_to(seeded_package)
    with contextlib.ExitStack() as stack:
        registry = stack.enter_context(
            started(workdir, "drafter-registry", "--package-path", "out/redis.drft")
        )
        assert registry.stdout is not None
        assert "serving" in registry.stdout.readline()
        first = stack.enter_context(
            started(
                workdir,
                "drafter-peer",
                "--netns",
                ark0,
                "--state-raddr",
                "localhost:1600",
                "--memory-raddr",
                "localhost:1601",
                "--initramfs-raddr",
                "localhost:1602",
                "--kernel-raddr",
                "localhost:1603",
                "--disk-raddr",
                "localhost:1604",
                "--netns",
                ark0,
                "--enable-input",
            )  # fmt: skip
        )
        wait_resumed(first)
        vm = wait_for_redis(network.info(0).external_address)
        assert vm.get("from") == b"the package"
        assert vm.set("hop", "0")
        wait_until_serving(1338)
        # No token anywhere, as in the seed: another local account reaches neither the
        # registry nor the peer serving the VM (issue 22, item 1).
        for port in (1337, 1338):
            nobody = dial_as_nobody(f"127.0.0.1:{port}")
            assert nobody.returncode == 3, nobody.stdout + nobody.stderr
            assert "requires a token (this user cannot read" in nobody.stdout

        second = stack.enter_context(
            started(workdir, "drafter-peer", "--netns", ark1, "--enable-input")
        )
        wait_resumed(second)
        exited_after_migration(first)
        vm = wait_for_redis(network.info(1).external_address)
        assert vm.get("hop") == b"0"
        assert vm.set("hop", "1")
        wait_until_serving(1338)  # the second peer took the address over

        third = stack.enter_context(started(workdir, "drafter-peer", "--netns", ark0))
        wait_resumed(third)
        exited_after_migration(second)
        vm = wait_for_redis(network.info(0).external_address)
        assert vm.get("hop") == b"1"
        assert vm.get("from") == b"the package"
        third.send_signal(signal.SIGINT)
        third.communicate(timeout=60)
        assert third.returncode == 0
