"""Registry and peers: start VMs from a served package without downloading it first."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import time

from support.common import wait_killed
from support.vms import ctrl_c, peer, registry, runner, wait_for_redis, wait_resumed


def test_peer_serves_the_package_data_and_takes_writes(seeded_package, network, workdir) -> None:
    before = hashlib.sha256(seeded_package.read_bytes()).hexdigest()
    with registry(seeded_package) as (_, raddr), peer(raddr, network.name(1), workdir) as p:
        wait_resumed(p)
        client = wait_for_redis(network.info(1).external_address)
        assert client.get("from") == b"the package"
        assert client.set("new", "write")
        assert client.get("new") == b"write"
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)
        assert p.returncode == 0
    assert hashlib.sha256(seeded_package.read_bytes()).hexdigest() == before
    assert not (workdir / "vms").exists() or list((workdir / "vms").iterdir()) == []


def test_four_peers_from_one_registry_are_independent(seeded_package, network, workdir) -> None:
    with registry(seeded_package) as (_, raddr), contextlib.ExitStack() as stack:
        peers = [stack.enter_context(peer(raddr, network.name(i), workdir)) for i in range(4)]
        for p in peers:
            wait_resumed(p)
        clients = [wait_for_redis(network.info(i).external_address) for i in range(4)]
        for i, client in enumerate(clients):
            assert client.get("from") == b"the package"
            assert client.set(f"only-in-{i}", i)
        for i, client in enumerate(clients):
            for j in range(4):
                assert (client.get(f"only-in-{j}") is not None) == (i == j)
        for p in peers:
            p.send_signal(signal.SIGINT)
        for p in peers:
            p.communicate(timeout=60)
            assert p.returncode == 0


def test_ctrl_c_with_package_output_path_resumes_in_runner(
    seeded_package, network, workdir
) -> None:
    out = workdir / "from-peer.drft"
    with (
        registry(seeded_package) as (_, raddr),
        peer(raddr, network.name(2), workdir, "--package-output-path", str(out)) as p,
    ):
        wait_resumed(p)
        assert wait_for_redis(network.info(2).external_address).set("peer", "wrote this")
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stderr
        assert "package written" in stdout
    with runner(out, network.name(3)) as proc:
        client = wait_for_redis(network.info(3).external_address)
        assert client.get("peer") == b"wrote this"
        assert client.get("from") == b"the package"
        ctrl_c(proc)


def test_registry_gone_mid_pull_stops_the_peer_with_a_clear_error(
    seeded_package, network, workdir
) -> None:
    with (
        registry(seeded_package) as (reg, raddr),
        peer(raddr, network.name(3), workdir, "--pull-workers", "1", "--retry-timeout", "3") as p,
    ):
        wait_resumed(p)
        reg.kill()  # the registry's network goes away while the peer still pulls
        wait_killed(reg)
        start = time.monotonic()
        _, stderr = p.communicate(timeout=60)
        assert p.returncode != 0
        assert time.monotonic() - start < 30  # bounded retries
        assert "all" not in stderr or "local after" not in stderr  # it was still pulling
        assert "Traceback" not in stderr
        assert "lost the connection" in stderr.strip().splitlines()[-1]
    assert not (workdir / "vms").exists() or list((workdir / "vms").iterdir()) == []
