"""Faults at the steps of a migration's hand-over, with real VMs: at most one copy of
the VM answers at any moment, and the outcome is the one docs/migration.md names.

A prober asks both namespaces' addresses, all the time, and records which one
answered; a writer appends to whichever answers (support.vms.Writer). The other
steps' faults are in test_migration.py (pre-copy, after the pause, source death) and
test_wire_peers.py (cuts during post-copy, a link down past the rescue timeout).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from support.common import StderrWatch, wait_killed
from support.net import CuttableProxy, free_port
from support.vms import (
    check_no_loss,
    migrate,
    peer,
    registry,
    wait_for_redis,
    wait_resumed,
    writing,
)


class Prober(threading.Thread):
    """PINGs every address every few ms; ``runs`` is which answered, in order (a new
    entry each time the answering address changes)."""

    def __init__(self, addresses: list[str]) -> None:
        super().__init__(daemon=True)
        self.clients = [
            redis.Redis(
                host=a,
                socket_timeout=0.05,
                socket_connect_timeout=0.05,
                retry=Retry(NoBackoff(), 0),
            )  # fmt: skip
            for a in addresses
        ]
        self.addresses = addresses
        self.runs: list[str] = []
        self.both: list[float] = []  # moments both answered in one round
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.is_set():
            answered = []
            for address, client in zip(self.addresses, self.clients, strict=True):
                with contextlib.suppress(redis.RedisError, OSError):
                    if client.ping():
                        answered.append(address)
            if len(answered) > 1:
                self.both.append(time.monotonic())
            for address in answered:
                if not self.runs or self.runs[-1] != address:
                    self.runs.append(address)
            time.sleep(0.01)


@contextlib.contextmanager
def probing(addresses: list[str]) -> Iterator[Prober]:
    prober = Prober(addresses)
    try:
        yield prober
    finally:
        prober.stop.set()
        prober.join(10)
    assert prober.both == [], f"both copies answered at {prober.both}"


def source_and_writer(stack: contextlib.ExitStack, seeded_package, network, workdir, *extra):
    """A registry, a source peer in namespace 0 serving its VM; returns the source,
    its stderr watch, its port and the two addresses."""
    addresses = [network.info(i).external_address for i in range(2)]
    _, raddr = stack.enter_context(registry(seeded_package))
    port = free_port()
    source = stack.enter_context(
        migrate(raddr, network.name(0), workdir, f"127.0.0.1:{port}", *extra)
    )
    wait_resumed(source)
    watch = StderrWatch(source)
    wait_for_redis(addresses[0]).delete("log")
    return source, watch, port, addresses


def destination(port: int, network, workdir, *extra: str, failpoints: str = ""):
    env = {**os.environ, "DRAFTER_FAILPOINTS": failpoints}
    return peer(f"127.0.0.1:{port}", network.name(1), workdir, *extra, laddr="", env=env)


def test_a_destination_that_cannot_load_the_state_gives_the_vm_back_at_once(
    seeded_package, network, workdir
) -> None:
    """QEMU at the destination fails to load (a failpoint): it aborts; the source
    resumes at once (no rescue timeout to wait), no write is lost."""
    with contextlib.ExitStack() as stack:
        source, watch, port, addresses = source_and_writer(
            stack, seeded_package, network, workdir, "--rescue-timeout", "0"
        )
        with probing(addresses) as prober, writing(addresses) as writer:
            dest = stack.enter_context(destination(port, network, workdir,
                                                   failpoints="after-load"))  # fmt: skip
            _, err = dest.communicate(timeout=120)
            assert dest.returncode != 0
            assert "failpoint after-load" in err.strip().splitlines()[-1], err
            watch.wait_for("gave the migration up", timeout=30)
            acked = len(writer.acked)
            time.sleep(1)
            assert len(writer.acked) > acked, "the source VM does not answer"
        assert prober.runs == [addresses[0]]
        assert source.poll() is None
        check_no_loss(addresses[0], writer)


def test_a_destination_killed_before_the_hand_over_is_rescued_by_the_source(
    seeded_package, network, workdir
) -> None:
    """Killed with the state in hand but before asking for the hand-over: the source
    resumes the VM after its rescue timeout; no write is lost."""
    with contextlib.ExitStack() as stack:
        source, watch, port, addresses = source_and_writer(
            stack, seeded_package, network, workdir, "--rescue-timeout", "1"
        )
        with probing(addresses) as prober, writing(addresses) as writer:
            dest = stack.enter_context(destination(port, network, workdir,
                                                   failpoints="before-handover:kill"))  # fmt: skip
            wait_killed(dest, 60)
            assert dest.returncode == -signal.SIGKILL
            watch.wait_for("lost the destination before the hand-over")
            watch.wait_for("the hand-over did not happen: no write is lost", timeout=30)
            acked = len(writer.acked)
            time.sleep(1)
            assert len(writer.acked) > acked, "the source VM does not answer"
        assert prober.runs == [addresses[0]]
        check_no_loss(addresses[0], writer)


def test_a_destination_killed_after_the_hand_over_is_never_forked(
    seeded_package, network, workdir
) -> None:
    """Killed right after the grant (post-copy, before DONE): the source does not
    resume by itself, even past its rescue timeout (the VM may have run there); its
    operator takes it back with SIGUSR1 and is told that writes are lost."""
    with contextlib.ExitStack() as stack:
        source, watch, port, addresses = source_and_writer(
            stack, seeded_package, network, workdir, "--rescue-timeout", "1"
        )
        with probing(addresses) as prober:
            dest = stack.enter_context(
                destination(
                    port,
                    network,
                    workdir,
                    "--pull-workers",
                    "1",
                    "--precopy-rounds",
                    "0",
                    failpoints="before-done:delay=60",  # killed before it says DONE
                )  # fmt: skip
            )
            wait_resumed(dest)
            watch.wait_for("handed the VM over")
            deadline = time.monotonic() + 30
            while prober.runs[-1:] != [addresses[1]]:  # the destination's VM answers
                assert time.monotonic() < deadline, prober.runs
                time.sleep(0.05)
            dest.kill()
            wait_killed(dest)
            watch.wait_for("lost the destination after the hand-over")
            time.sleep(3)  # well past the rescue timeout
            assert not any("resuming the VM here" in line for line in watch.lines)
            assert source.poll() is None
            with contextlib.suppress(redis.RedisError):
                raise AssertionError(
                    f"the source answers: {wait_for_redis(addresses[0], timeout=1)}"
                )
            source.send_signal(signal.SIGUSR1)  # the operator takes it back
            watch.wait_for("writes the destination took since the hand-over are lost")
            assert wait_for_redis(addresses[0]).ping()
            deadline = time.monotonic() + 10
            while prober.runs[-1:] != [addresses[0]]:  # the prober saw it too
                assert time.monotonic() < deadline, prober.runs
                time.sleep(0.05)
        assert prober.runs == [addresses[0], addresses[1], addresses[0]]


def test_a_cut_between_the_hand_over_and_done_heals_and_completes(
    seeded_package, network, workdir
) -> None:
    with contextlib.ExitStack() as stack:
        source, watch, port, addresses = source_and_writer(
            stack, seeded_package, network, workdir, "--rescue-timeout", "1"
        )
        proxy = CuttableProxy(port)
        stack.callback(proxy.close)
        with probing(addresses) as prober, writing(addresses) as writer:
            dest = stack.enter_context(
                destination(
                    proxy.port,
                    network,
                    workdir,
                    "--pull-workers",
                    "1",
                    "--precopy-rounds",
                    "0",
                    "--retry-timeout",
                    "30",
                    failpoints="before-done:delay=2",  # the cut lands before DONE
                )  # fmt: skip
            )
            watch.wait_for("handed the VM over")
            proxy.refuse_until = time.monotonic() + 3  # down for longer than the rescue timeout
            proxy.cut()
            wait_resumed(dest)
            out, err = source.communicate(timeout=120)
            assert source.returncode == 0, err
            assert "migrated away" in out
            lines = watch.lines + err.splitlines()
            assert not any("resuming the VM here" in line for line in lines), lines
        assert prober.runs == addresses
        check_no_loss(addresses[1], writer)
        dest.send_signal(signal.SIGINT)
        dest.communicate(timeout=60)
        assert dest.returncode == 0
