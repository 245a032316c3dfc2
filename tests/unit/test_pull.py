"""Unit tests of :class:`drafter.peer.pull.PullPool` over devices with an in-memory
chunk source (no QEMU, no network)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from drafter.chunks import DEVICES, ZERO_HASH, Priority
from drafter.device import Device
from drafter.errors import DrafterError
from drafter.peer.pull import PASSES, PULL_RUN, PullPool
from drafter.peer.summary import PullProgress
from support.chunk_sources import CS, Call, FakeSource, as_source, pattern, until


def devices_of(tmp_path: Path, source: FakeSource, order: Sequence[str]) -> dict[str, Device]:
    """A device per resource of ``source``, in the dict in ``order``, hashes expected."""
    devices: dict[str, Device] = {}
    for name in order:
        device = Device(
            name,
            source.manifest[name],
            None,
            tmp_path / f"{name}.overlay",
            chunk_size=source.chunk_size,
            source=as_source(source),
        )
        device.expect(source.hashes[name])
        devices[name] = device
    return devices


def all_local(devices: dict[str, Device], source: FakeSource) -> bool:
    return all(
        d.missing() == [] and d.read(0, d.size) == source.contents[name]
        for name, d in devices.items()
    )


class Reports:
    """A ``report`` callback that keeps (done, total, finished) at each call."""

    def __init__(self, progress: PullProgress) -> None:
        self.progress = progress
        self.seen: list[tuple[int, int, float | None]] = []

    def __call__(self) -> None:
        p = self.progress
        self.seen.append((p.done, p.total, p.finished))


def four_devices(tmp_path: Path) -> tuple[FakeSource, dict[str, Device]]:
    """Kernel 3 chunks, initramfs 1 (short), memory 40 (chunk 20 zeros), disk 18 (the
    last short); the dict is in an order unlike DEVICES."""
    memory = bytearray(pattern(40 * CS, 3))
    memory[20 * CS : 21 * CS] = bytes(CS)
    source = FakeSource(
        {
            "kernel": pattern(3 * CS, 1),
            "initramfs": pattern(1000, 2),
            "memory": bytes(memory),
            "disk": pattern(17 * CS + 10, 4),
        }
    )
    return source, devices_of(tmp_path, source, ["disk", "memory", "initramfs", "kernel"])


def test_runs_cut_missing_chunks_in_device_order(tmp_path: Path) -> None:
    source, devices = four_devices(tmp_path)
    assert devices["memory"].local[20] == 1  # a zero chunk is local at once
    devices["memory"].fill(5, source.contents["memory"][5 * CS : 6 * CS], None)
    pool = PullPool(devices, workers=4)
    queue = pool.runs()
    runs = []
    while not queue.empty():
        device, start, count = queue.get_nowait()
        runs.append((device.name, start, count))
    assert PULL_RUN == 16 and DEVICES == ("kernel", "initramfs", "memory", "disk")
    assert runs == [
        ("kernel", 0, 3),
        ("initramfs", 0, 1),
        ("memory", 0, 5),
        ("memory", 6, 14),  # up to the zero chunk 20
        ("memory", 21, 16),  # at most PULL_RUN
        ("memory", 37, 3),
        ("disk", 0, 16),
        ("disk", 16, 2),
    ]
    assert source.calls == []  # cutting runs asks nothing


def test_runs_of_local_devices_are_none(tmp_path: Path) -> None:
    source = FakeSource({"memory": bytes(8 * CS)})  # all zeros: all local
    devices = devices_of(tmp_path, source, ["memory"])
    assert PullPool(devices, workers=2).runs().empty()


@pytest.mark.parametrize("workers", [1, 3, 20])
def test_pull_missing_bounds_runs_in_flight(tmp_path: Path, workers: int) -> None:
    source, devices = four_devices(tmp_path)
    pool = PullPool(devices, workers=workers)
    runs = pool.runs().qsize()
    assert runs == 8
    asyncio.run(pool.pull_missing())
    assert all_local(devices, source)
    assert source.peak == min(workers, runs)
    assert len(source.calls) == runs  # one request per run, each chunk asked for once
    assert {c.priority for c in source.calls} == {Priority.BACKGROUND}
    assert pool.progress.done == 0 and pool.progress.finished is None  # not counted


def test_pull_missing_with_no_workers_still_uses_one(tmp_path: Path) -> None:
    source, devices = four_devices(tmp_path)
    asyncio.run(PullPool(devices, workers=0).pull_missing())
    assert all_local(devices, source)
    assert source.peak == 1


def test_pull_all_counts_progress_to_the_total(tmp_path: Path) -> None:
    source, devices = four_devices(tmp_path)
    memory = devices["memory"]
    memory.fill(5, source.contents["memory"][5 * CS : 6 * CS], None)
    progress = PullProgress()
    reports = Reports(progress)
    pool = PullPool(devices, workers=3, progress=progress, report=reports)
    total = sum(len(b) for b in source.contents.values())
    already = 2 * CS  # memory chunk 5 (filled) and chunk 20 (zeros)
    asyncio.run(pool.pull_all())
    assert all_local(devices, source)
    assert progress.total == total
    assert progress.done == total
    assert progress.finished is not None and progress.finished >= progress.started
    assert reports.seen[0] == (already, total, None)  # told at once what is local
    dones = [done for done, _, _ in reports.seen]
    assert dones == sorted(dones)  # only ever up
    assert all(done <= total for done in dones)
    assert len(reports.seen) == 1 + 8 + 1  # at the start, after each run, at the end
    assert reports.seen[-1] == (total, total, progress.finished)
    assert reports.seen[-2][0] == total  # the runs add up to everything missing
    assert len(source.calls) == 8


def test_pull_all_with_nothing_missing(tmp_path: Path) -> None:
    source = FakeSource({"memory": bytes(3 * CS), "disk": bytes(100)})
    devices = devices_of(tmp_path, source, ["memory", "disk"])
    progress = PullProgress()
    asyncio.run(PullPool(devices, workers=2, progress=progress).pull_all())
    assert source.calls == []
    assert progress.done == progress.total == 3 * CS + 100
    assert progress.finished is not None


def _demand_failed_elsewhere(tmp_path: Path) -> tuple[FakeSource, dict[str, Device], Reports]:
    """pull_all while a demand fetch of memory chunk 2 is in flight (so the pull skips
    it) and then fails: a later pass must pull it."""
    source = FakeSource({"memory": pattern(6 * CS), "disk": pattern(2 * CS)})
    source.fail_once.add(("memory", 2))
    devices = devices_of(tmp_path, source, ["memory", "disk"])
    progress = PullProgress()
    reports = Reports(progress)
    pool = PullPool(devices, workers=2, progress=progress, report=reports)
    memory = devices["memory"]

    async def main() -> None:
        gate = source.hold[Priority.DEMAND] = asyncio.Event()
        demand = asyncio.ensure_future(memory.ensure_chunk(2, Priority.DEMAND))
        await until(lambda: len(source.calls) == 1)
        pull = asyncio.ensure_future(pool.pull_all())
        # The first pass asks for everything but the chunk on its way.
        await until(lambda: pull.done() or (len(source.calls) == 4 and source.inflight == 1))
        if pull.done():
            pull.result()  # it ended early: its error
        for _ in range(100):  # the pull waits for the fetch on its way (no empty passes)
            await asyncio.sleep(0)
        assert not pull.done()
        gate.set()
        with pytest.raises(DrafterError):
            await demand
        await asyncio.wait_for(pull, 2)

    asyncio.run(main())
    return source, devices, reports


def test_pull_all_pulls_again_a_chunk_whose_fetch_elsewhere_failed(tmp_path: Path) -> None:
    source, devices, reports = _demand_failed_elsewhere(tmp_path)
    assert all_local(devices, source)
    assert source.requested("memory", 2) == [Priority.DEMAND, Priority.BACKGROUND]
    assert source.calls[1:4] == [  # pass 1 around the chunk in flight
        Call("memory", 0, 2, Priority.BACKGROUND),
        Call("memory", 3, 3, Priority.BACKGROUND),
        Call("disk", 0, 2, Priority.BACKGROUND),
    ]
    assert source.calls[4:] == [Call("memory", 2, 1, Priority.BACKGROUND)]  # pass 2
    total = 8 * CS
    assert reports.seen[-1] == (total, total, reports.progress.finished)
    assert reports.progress.finished is not None


def test_pull_all_progress_never_passes_the_total(tmp_path: Path) -> None:
    _, _, reports = _demand_failed_elsewhere(tmp_path)
    total = 8 * CS
    assert max(done for done, _, _ in reports.seen) <= total


def test_pull_all_fails_when_a_chunk_stays_missing_after_every_pass(tmp_path: Path) -> None:
    source = FakeSource({"memory": pattern(4 * CS)})
    source.drop.add(("memory", 1))  # every request comes back without it
    devices = devices_of(tmp_path, source, ["memory"])
    progress = PullProgress()
    with pytest.raises(DrafterError, match=f"after pulling them {PASSES} times"):
        asyncio.run(PullPool(devices, workers=2, progress=progress).pull_all())
    assert source.requested("memory", 1) == [Priority.BACKGROUND] * PASSES
    assert devices["memory"].missing() == [1]
    assert progress.finished is None


def test_pull_all_fails_when_a_chunk_keeps_failing(tmp_path: Path) -> None:
    source = FakeSource({"memory": pattern(4 * CS), "disk": pattern(CS)})
    source.fail.add(("memory", 1))
    devices = devices_of(tmp_path, source, ["memory", "disk"])
    progress = PullProgress()
    with pytest.raises(DrafterError, match="cannot be had"):
        asyncio.run(PullPool(devices, workers=1, progress=progress).pull_all())
    assert 1 <= len(source.requested("memory", 1)) <= PASSES
    assert 1 in devices["memory"].missing()
    assert progress.finished is None


def test_a_failure_of_the_pool_s_own_fetch_ends_pull_all_at_once(tmp_path: Path) -> None:
    # By design: the pool's source already tried again through reconnects, so a fetch
    # it gives up on ends the pull (only chunks fetched elsewhere get the passes).
    source = FakeSource({"memory": pattern(4 * CS), "disk": pattern(CS)})
    source.fail_once.add(("memory", 1))
    devices = devices_of(tmp_path, source, ["memory", "disk"])
    progress = PullProgress()
    with pytest.raises(DrafterError):
        asyncio.run(PullPool(devices, workers=2, progress=progress).pull_all())
    assert source.requested("memory", 1) == [Priority.BACKGROUND]
    assert progress.finished is None


def test_zero_hash_chunks_are_never_pulled(tmp_path: Path) -> None:
    data = pattern(4 * CS)
    data = data[:CS] + bytes(2 * CS) + data[3 * CS :]
    source = FakeSource({"disk": data})
    assert source.hashes["disk"][1:3] == [ZERO_HASH, ZERO_HASH]
    devices = devices_of(tmp_path, source, ["disk"])
    progress = PullProgress()
    asyncio.run(PullPool(devices, workers=2, progress=progress).pull_all())
    assert source.calls == [
        Call("disk", 0, 1, Priority.BACKGROUND),
        Call("disk", 3, 1, Priority.BACKGROUND),
    ]
    assert all_local(devices, source)
