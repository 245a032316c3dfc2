"""Live migration between peers while a Redis client keeps writing."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drafter.transport.client import RemoteSource
from drafter.transport.protocol import MsgType
from support.common import StderrWatch, wait_killed
from support.net import free_port
from support.vms import (
    check_no_loss,
    finish_source,
    migrate,
    peer,
    registry,
    wait_for_redis,
    wait_resumed,
    writing,
)


@contextlib.contextmanager
def offered_migration(raddr: str) -> Iterator[None]:
    """A wire client that offers a migration and then holds it in pre-copy."""
    import asyncio

    from drafter.migration import KeyShare, encode_offer_call

    ready = threading.Event()
    release = threading.Event()
    failure: list[BaseException] = []

    async def hold() -> None:
        source = RemoteSource(raddr)
        try:
            await source.connect()
            await source.call(MsgType.MIGRATE_OFFER, encode_offer_call(KeyShare()))
            ready.set()
            while not release.is_set():
                await asyncio.sleep(0.05)
        finally:
            await source.close()

    def run() -> None:
        try:
            asyncio.run(hold())
        except BaseException as e:
            failure.append(e)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "the offer was not answered"
        assert not failure, failure
        yield
    finally:
        release.set()
        thread.join(10)


def run_chain(seeded_package, network, workdir: Path, *extra: str) -> list[str]:
    """ns0 → ns1 → ns2 → ns0 under a writer; returns the destinations' summaries."""
    hops = [0, 1, 2, 0]
    addresses = [network.info(i).external_address for i in range(3)]
    summaries = []
    with registry(seeded_package) as (_, raddr), contextlib.ExitStack() as stack:
        ports = [free_port() for _ in hops]
        first = stack.enter_context(
            migrate(raddr, network.name(0), workdir, f"127.0.0.1:{ports[0]}")
        )
        wait_resumed(first)
        wait_for_redis(addresses[0]).delete("log")
        source = first
        with writing(addresses) as writer:
            time.sleep(1)
            for hop in range(1, len(hops)):
                dest = stack.enter_context(
                    migrate(
                        f"127.0.0.1:{ports[hop - 1]}",
                        network.name(hops[hop]),
                        workdir,
                        f"127.0.0.1:{ports[hop]}",
                        *extra,
                    )  # fmt: skip
                )
                wait_resumed(dest)
                finish_source(source)
                assert dest.stdout is not None
                for line in iter(dest.stdout.readline, ""):
                    if line.startswith("migrated from"):
                        summaries.append(line.strip())
                        break
                source = dest
                time.sleep(1)
        assert writer.errors < 1000
        check_no_loss(addresses[0], writer)
        source.send_signal(signal.SIGINT)
        source.communicate(timeout=60)
        assert source.returncode == 0
    return summaries


def test_chain_keeps_every_acknowledged_write(seeded_package, network, workdir) -> None:
    summaries = run_chain(seeded_package, network, workdir)
    assert len(summaries) == 3, summaries
    assert all("downtime" in s for s in summaries)


def test_chain_with_resume_threshold_zero(seeded_package, network, workdir) -> None:
    summaries = run_chain(seeded_package, network, workdir, "--resume-threshold", "0")
    assert len(summaries) == 3, summaries


def test_chain_with_pure_post_copy(seeded_package, network, workdir) -> None:
    summaries = run_chain(seeded_package, network, workdir, "--precopy-rounds", "0")
    assert all("0 pre-copy round(s)" in s for s in summaries), summaries


def test_rollback_when_the_destination_dies_in_precopy(seeded_package, network, workdir) -> None:
    address = network.info(0).external_address
    with registry(seeded_package) as (_, raddr), contextlib.ExitStack() as stack:
        port = free_port()
        source = stack.enter_context(migrate(raddr, network.name(0), workdir, f"127.0.0.1:{port}"))
        wait_resumed(source)
        events = StderrWatch(source)
        with writing([address]) as writer:
            dest = stack.enter_context(
                migrate(f"127.0.0.1:{port}", network.name(1), workdir, "", "--pull-workers", "1")
            )
            events.wait_for("pre-copy starts")  # the source logs the offer
            dest.kill()  # while it pulls, long before switch-over
            wait_killed(dest)
            assert not any("switched over" in line for line in events.lines)
            events.wait_for("left before switch-over")
            time.sleep(2)
            acked = len(writer.acked)
            time.sleep(1)
            assert len(writer.acked) > acked, "the source VM stopped answering"
            assert source.poll() is None
            # A second migration to a new destination then succeeds.
            second = stack.enter_context(migrate(f"127.0.0.1:{port}", network.name(2), workdir, ""))
            wait_resumed(second)
            finish_source(source)
            writer.addresses = [network.info(2).external_address]
            time.sleep(1)
        check_no_loss(network.info(2).external_address, writer)
        assert max(writer.gaps) < 10


def test_source_death_after_switch_over_with_threshold_zero(
    seeded_package,
    network,
    workdir,
) -> None:
    with registry(seeded_package) as (_, raddr), contextlib.ExitStack() as stack:
        port = free_port()
        source = stack.enter_context(migrate(raddr, network.name(0), workdir, f"127.0.0.1:{port}"))
        wait_resumed(source)
        assert wait_for_redis(network.info(0).external_address).set("before", "move")
        dest = stack.enter_context(
            migrate(f"127.0.0.1:{port}", network.name(1), workdir, "", "--resume-threshold", "0")
        )
        wait_resumed(dest)
        source.kill()
        wait_killed(source)
        client = wait_for_redis(network.info(1).external_address)
        for i in range(20):
            assert client.set(f"after{i}", i)
            time.sleep(0.1)
        assert client.get("before") == b"move"
        assert dest.poll() is None
        dest.send_signal(signal.SIGINT)
        dest.communicate(timeout=60)
        assert dest.returncode == 0


@pytest.mark.parametrize("bad", ["garbage", "wrong version", "second migration"])
def test_bad_destinations_are_refused_without_disturbing_the_vm(
    seeded_package,
    network,
    workdir,
    bad: str,
) -> None:
    address = network.info(0).external_address
    with registry(seeded_package) as (_, raddr), contextlib.ExitStack() as stack:
        port = free_port()
        source = stack.enter_context(migrate(raddr, network.name(0), workdir, f"127.0.0.1:{port}"))
        wait_resumed(source)
        with writing([address]) as writer:
            if bad == "garbage":
                with socket.create_connection(("127.0.0.1", port)) as s:
                    s.sendall(b"\x00\x00\xff\xffGARBAGE" * 100)
                    time.sleep(0.5)
            elif bad == "wrong version":
                with socket.create_connection(("127.0.0.1", port)) as s:
                    s.sendall(b"\x00\x00\x00\x28\x01\x00\x00\x00\x00\x00\x00\x00DRFT\x00\x01")
                    s.sendall(b"\x00" * 36)
                    time.sleep(0.5)
            else:
                with offered_migration(f"127.0.0.1:{port}"):
                    second = stack.enter_context(
                        migrate(f"127.0.0.1:{port}", network.name(2), workdir, "")
                    )
                    _, err = second.communicate(timeout=60)
                    assert second.returncode != 0
                    assert "already pre-copy" in err.strip().splitlines()[-1]
            time.sleep(1)
            acked = len(writer.acked)
            time.sleep(1)
            assert len(writer.acked) > acked
        assert source.poll() is None
        check_no_loss(address, writer)
        source.send_signal(signal.SIGINT)
        source.communicate(timeout=60)
        assert source.returncode == 0


def test_an_idle_offer_times_out_and_the_next_destination_migrates(
    seeded_package, network, workdir
) -> None:
    addresses = [network.info(i).external_address for i in range(2)]
    with registry(seeded_package) as (_, raddr), contextlib.ExitStack() as stack:
        port = free_port()
        source = stack.enter_context(
            migrate(raddr, network.name(0), workdir, f"127.0.0.1:{port}", "--offer-timeout", "2")
        )
        wait_resumed(source)
        watch = StderrWatch(source)
        wait_for_redis(addresses[0]).delete("log")
        with writing(addresses) as writer, offered_migration(f"127.0.0.1:{port}"):
            # The holder offered and says nothing more: after 2 s it loses the migration.
            watch.wait_for("forgetting it", timeout=30)
            dest = stack.enter_context(migrate(f"127.0.0.1:{port}", network.name(1), workdir, ""))
            wait_resumed(dest)
            finish_source(source)
        check_no_loss(addresses[1], writer)
        dest.send_signal(signal.SIGINT)
        dest.communicate(timeout=60)
        assert dest.returncode == 0


def test_a_failure_after_the_pause_resumes_the_vm_at_the_source(
    seeded_package, network, workdir
) -> None:
    """Saving the state fails once the source VM is paused (a failpoint): the source
    resumes its VM, AfterResume included, and keeps answering; the destination stops."""
    import os

    address = network.info(0).external_address
    env = {**os.environ, "DRAFTER_FAILPOINTS": "after-pause"}
    with registry(seeded_package) as (_, raddr), contextlib.ExitStack() as stack:
        port = free_port()
        source = stack.enter_context(
            peer(raddr, network.name(0), workdir, laddr=f"127.0.0.1:{port}", env=env)
        )
        wait_resumed(source)
        watch = StderrWatch(source)
        wait_for_redis(address).delete("log")
        with writing([address]) as writer:
            dest = stack.enter_context(migrate(f"127.0.0.1:{port}", network.name(1), workdir, ""))
            _, err = dest.communicate(timeout=120)
            assert dest.returncode != 0
            assert "switch-over failed" in err.strip().splitlines()[-1], err
            watch.wait_for("the VM runs here again (resumed, AfterResume done)")
            acked = len(writer.acked)
            time.sleep(1)
            assert len(writer.acked) > acked, "the source VM does not answer"
        assert source.poll() is None
        check_no_loss(address, writer)


def test_done_from_another_connection_is_refused(seeded_package, network, workdir) -> None:
    import asyncio

    from drafter.errors import DrafterError
    from drafter.migration import encode_id

    with registry(seeded_package) as (_, raddr), contextlib.ExitStack() as stack:
        port = free_port()
        source = stack.enter_context(migrate(raddr, network.name(0), workdir, f"127.0.0.1:{port}"))
        wait_resumed(source)

        async def done_from_elsewhere(body: bytes) -> str:
            other = RemoteSource(f"127.0.0.1:{port}")
            try:
                await other.connect()
                await other.call(MsgType.MIGRATE_DONE, body)
            except DrafterError as e:
                return str(e)
            finally:
                await other.close()
            return "accepted"

        with offered_migration(f"127.0.0.1:{port}"):
            for body in (b"", encode_id("not-the-migration")):
                answer = asyncio.run(done_from_elsewhere(body))
                assert "no such switched-over migration" in answer, answer
        assert source.poll() is None  # the VM was not handed over
        assert wait_for_redis(network.info(0).external_address).ping()
