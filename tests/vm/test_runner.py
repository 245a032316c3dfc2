"""Package once, then run, write, Ctrl-C, run again: the data survives every round."""

from __future__ import annotations

import hashlib
import signal
import subprocess

from support.common import command, stop_process
from support.net import free_port
from support.vms import copy_package, ctrl_c, runner, wait_for_redis


def test_keys_survive_three_rounds_of_run_and_ctrl_c(redis_package, network, workdir) -> None:
    package = copy_package(redis_package, workdir)
    address = network.info(1).external_address
    for round_ in range(4):
        with runner(package, network.name(1)) as proc:
            client = wait_for_redis(address)
            for earlier in range(round_):
                assert client.get(f"key{earlier}") == f"value{earlier}".encode()
            if round_ < 3:
                assert client.set(f"key{round_}", f"value{round_}")
            ctrl_c(proc)


def test_persist_false_never_modifies_the_package(redis_package, network, workdir) -> None:
    package = copy_package(redis_package, workdir)
    before = hashlib.sha256(package.read_bytes()).hexdigest()
    with runner(package, network.name(2), "--persist=false") as proc:
        client = wait_for_redis(network.info(2).external_address)
        assert client.set("ephemeral", "yes")
        ctrl_c(proc)
    assert hashlib.sha256(package.read_bytes()).hexdigest() == before
    with runner(package, network.name(2), "--persist=false") as proc:
        assert wait_for_redis(network.info(2).external_address).get("ephemeral") is None
        ctrl_c(proc)


def test_forwarder_carries_a_redis_session(redis_package, network, workdir) -> None:
    package = copy_package(redis_package, workdir)
    port = free_port()
    forwards = (
        f'[{{"netns":"{network.name(3)}","internalPort":"6379","protocol":"tcp",'
        f'"externalAddr":"127.0.0.1:{port}"}}]'
    )
    with runner(package, network.name(3), "--persist=false") as proc:
        wait_for_redis(network.info(3).external_address)
        fwd = subprocess.Popen(
            [
                command("drafter-forwarder"),
                "--port-forwards",
                forwards,
                "--state-dir",
                str(network.state_dir),
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            client = wait_for_redis("127.0.0.1", port, timeout=20)
            assert client.set("through", "the forwarder")
            assert client.get("through") == b"the forwarder"
            assert client.incr("counter") == 1
            assert client.incr("counter") == 2
        finally:
            assert stop_process(fwd) == 0
        ctrl_c(proc)


def test_a_flush_onto_a_full_disk_keeps_the_vm_until_it_can_be_written(
    redis_package, network, workdir
) -> None:
    """Ctrl-C with the output on a full file system: one line says nothing is lost
    yet and the runner keeps the suspended VM; once there is room, Ctrl-C again
    writes it, with the write made before the first Ctrl-C."""
    package = copy_package(redis_package, workdir)
    small = workdir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(small)], check=True)
    try:
        out = small / "out.drft"
        with runner(package, network.name(1), "--package-output-path", str(out)) as proc:
            assert wait_for_redis(network.info(1).external_address).set("kept", "through it")
            proc.send_signal(signal.SIGINT)
            assert proc.stderr is not None
            lines = [proc.stderr.readline()]
            while "could not write" not in lines[-1] and lines[-1]:
                lines.append(proc.stderr.readline())
            said = lines[-1]
            assert "No space left on device" in said and "Nothing is lost yet" in said, (
                "".join(lines) + proc.stdout.read()  # type: ignore[union-attr]
            )
            assert proc.poll() is None  # it waits
            assert list(small.iterdir()) == []  # no half-written package
            subprocess.run(["mount", "-o", "remount,size=2G", str(small)], check=True)
            proc.send_signal(signal.SIGINT)
            out_text, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert "snapshot written" in out_text
        with runner(out, network.name(1)) as proc:
            assert wait_for_redis(network.info(1).external_address).get("kept") == b"through it"
            ctrl_c(proc)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
