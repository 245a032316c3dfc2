"""Unit tests of :class:`drafter.device.Device` against an in-memory chunk source.

No QEMU, no FUSE, no network: a device is a pair of files under ``tmp_path`` and the
source is :class:`FakeSource`, which records every request it is asked for.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from drafter.chunks import (
    ZERO_HASH,
    Priority,
    chunk_count,
    chunk_length,
    chunk_span,
)
from drafter.device import Device, FileRange, MissingChunkError
from drafter.errors import DrafterError
from drafter.hashes import digest
from support.chunk_sources import CS, Call, FakeSource, as_source, pattern, until

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def raises(awaitable: Awaitable[object], kind: type[BaseException]) -> BaseException:
    try:
        await awaitable
    except kind as e:
        return e
    raise AssertionError(f"{kind.__name__} not raised")


SIZE = 3 * CS + 1000  # four chunks, the last one short
DATA = pattern(SIZE)


def remote_device(
    tmp_path: Path,
    source: FakeSource,
    name: str = "disk",
    binding: bool = True,
    expect: bool = True,
) -> Device:
    device = Device(
        name,
        source.manifest[name],
        None,
        tmp_path / f"{name}.overlay",
        chunk_size=source.chunk_size,
        source=as_source(source),
    )
    if expect:
        device.expect(source.hashes[name], binding)
    return device


def local_device(tmp_path: Path, data: bytes, chunk_size: int = CS) -> Device:
    """A device without a source whose base is a plain file holding ``data``."""
    base = tmp_path / "base"
    base.write_bytes(data)
    return Device("disk", len(data), FileRange.whole(base), tmp_path / "overlay", True, chunk_size)


# -- helpers of chunks.py ------------------------------------------------------------


def test_chunk_helpers() -> None:
    assert chunk_count(SIZE, CS) == 4
    assert [chunk_length(SIZE, CS, i) for i in range(4)] == [CS, CS, CS, 1000]
    assert chunk_span(CS - 1, 2, CS) == range(0, 2)
    assert chunk_span(CS, CS, CS) == range(1, 2)
    assert chunk_span(5, 0, CS) == range(0)


# -- without a source ----------------------------------------------------------------


def test_no_source_reads_base(tmp_path: Path) -> None:
    device = local_device(tmp_path, DATA)
    assert device.read(0, SIZE) == DATA
    assert device.read(CS - 10, 30) == DATA[CS - 10 : CS + 20]
    assert device.read(SIZE - 5, 100) == DATA[-5:]  # short only at the end
    assert device.read(SIZE, 10) == b""
    assert device.read_chunk(3) == (DATA[3 * CS :], None)
    assert device.missing() == [] and device.missing_bytes() == 0
    run(device.ensure(0, SIZE, Priority.DEMAND))  # nothing to fetch from: a no-op
    run(device.pull_run(0, device.chunks))
    assert device.fetched_bytes == 0


def test_no_source_no_base_reads_zeros(tmp_path: Path) -> None:
    device = Device("memory", SIZE, None, tmp_path / "overlay", chunk_size=CS)
    assert device.read(0, SIZE) == bytes(SIZE)
    assert device.missing() == []


def test_base_of_wrong_size_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.write_bytes(DATA)
    with pytest.raises(DrafterError):
        Device("disk", SIZE + 1, FileRange.whole(base), tmp_path / "overlay", chunk_size=CS)


def test_partial_write_copies_the_rest_of_the_chunk_from_base(tmp_path: Path) -> None:
    device = local_device(tmp_path, DATA)
    assert device.write(CS + 100, b"\xff" * 10) == 10
    expected = DATA[: CS + 100] + b"\xff" * 10 + DATA[CS + 110 :]
    assert device.read(0, SIZE) == expected
    assert (tmp_path / "base").read_bytes() == DATA  # the base is never written
    assert device.local[1] == 1 and device.local[0] == 0


def test_write_beyond_end_and_read_only(tmp_path: Path) -> None:
    device = local_device(tmp_path, DATA)
    with pytest.raises(ValueError):
        device.write(SIZE - 1, b"ab")
    device.writable = False
    with pytest.raises(PermissionError):
        device.write(0, b"a")


# -- with a source: reads, ensure, in-flight dedup -------------------------------------


def test_read_of_missing_chunk_raises(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)
    assert device.missing() == [0, 1, 2, 3]
    assert device.missing_bytes() == SIZE
    with pytest.raises(MissingChunkError):
        device.read(CS + 1, 1)
    with pytest.raises(MissingChunkError):
        device.read_chunk(0)
    assert source.calls == []  # a read never fetches


def test_ensure_fetches_exactly_the_chunks_under_the_range(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)
    run(device.ensure(CS - 1, 2, Priority.DEMAND))  # one byte of chunk 0, one of 1
    assert sorted(source.calls) == [
        Call("disk", 0, 1, Priority.DEMAND),
        Call("disk", 1, 1, Priority.DEMAND),
    ]
    assert device.read(0, 2 * CS) == DATA[: 2 * CS]
    assert device.missing() == [2, 3]
    run(device.ensure(0, 2 * CS, Priority.DEMAND))  # local already: nothing asked
    assert len(source.calls) == 2
    run(device.ensure(SIZE - 10, 1000, Priority.PREFETCH))  # clipped at the end
    assert source.calls[2:] == [Call("disk", 3, 1, Priority.PREFETCH)]
    run(device.ensure(SIZE, 100, Priority.DEMAND))  # past the end: nothing
    run(device.ensure(0, 0, Priority.DEMAND))  # empty: nothing
    assert len(source.calls) == 3
    with pytest.raises(MissingChunkError):
        device.read(0, SIZE)  # chunk 2 was never asked for


def test_ensure_partial_only_skips_chunks_covered_whole(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)
    # A write of [100, 2*CS + 100) covers chunk 1 whole; chunks 0 and 2 only in part.
    run(device.ensure(100, 2 * CS, Priority.DEMAND, partial_only=True))
    assert sorted(c.start for c in source.calls) == [0, 2]


def test_one_fetch_in_flight_per_chunk(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)

    async def main() -> None:
        gate = source.hold[Priority.DEMAND] = asyncio.Event()
        waiters = [
            asyncio.ensure_future(device.ensure(CS + i, 10, Priority.DEMAND)) for i in range(5)
        ]
        await until(lambda: len(source.calls) >= 1)
        # Lower priorities share the demand in flight.
        waiters.append(asyncio.ensure_future(device.ensure_chunk(1, Priority.PREFETCH)))
        waiters.append(asyncio.ensure_future(device.ensure_chunk(1, Priority.BACKGROUND)))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        gate.set()
        await asyncio.gather(*waiters)

    run(main())
    assert source.calls == [Call("disk", 1, 1, Priority.DEMAND)]
    assert device.read(CS, CS) == DATA[CS : 2 * CS]
    assert device.fetched_bytes == CS


def test_demand_overtakes_a_prefetch(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)

    async def main() -> None:
        gate = source.hold[Priority.PREFETCH] = asyncio.Event()
        prefetch = asyncio.ensure_future(device.ensure_chunk(2, Priority.PREFETCH))
        await until(lambda: len(source.calls) == 1)
        # A second prefetch shares the one in flight; a demand does not wait for it.
        again = asyncio.ensure_future(device.ensure_chunk(2, Priority.PREFETCH))
        await asyncio.wait_for(device.ensure(2 * CS, 1, Priority.DEMAND), 1)
        assert device.read(2 * CS, CS) == DATA[2 * CS : 3 * CS]
        assert not prefetch.done()
        gate.set()
        await asyncio.gather(prefetch, again)

    run(main())
    assert source.calls == [
        Call("disk", 2, 1, Priority.PREFETCH),
        Call("disk", 2, 1, Priority.DEMAND),
    ]
    assert device.fetched_bytes == CS  # the later copy is not stored again
    assert device.first_demand_at is not None


BIG = pattern(12 * CS, seed=3)  # twelve chunks


def test_ensure_runs_asks_once_per_run_of_consecutive_chunks(tmp_path: Path) -> None:
    source = FakeSource({"disk": BIG})
    device = remote_device(tmp_path, source)
    run(device.ensure_chunk(3, Priority.DEMAND))  # local already: never asked again
    source.calls.clear()
    # In the order given (a hot set's first-touch order): 0-2, then 4 (3 is local),
    # 9-10, 5-7 capped at 3 chunks a request, then 8.
    run(device.ensure_runs([0, 1, 2, 3, 4, 9, 10, 5, 6, 7, 8], Priority.PREFETCH, 3))
    assert source.calls == [
        Call("disk", 0, 3, Priority.PREFETCH),
        Call("disk", 4, 1, Priority.PREFETCH),
        Call("disk", 9, 2, Priority.PREFETCH),
        Call("disk", 5, 3, Priority.PREFETCH),
        Call("disk", 8, 1, Priority.PREFETCH),
    ]
    assert device.read(0, 11 * CS) == BIG[: 11 * CS]
    assert device.missing() == [11]


def test_a_run_in_flight_serves_every_chunk_of_it(tmp_path: Path) -> None:
    source = FakeSource({"disk": BIG})
    device = remote_device(tmp_path, source)

    async def main() -> None:
        gate = source.hold[Priority.DEMAND] = asyncio.Event()
        whole = asyncio.ensure_future(device.ensure_runs(list(range(12)), Priority.DEMAND, 8))
        await until(lambda: len(source.calls) == 2)
        # A fault inside the run, a prefetch and the background pull wait for it.
        fault = asyncio.ensure_future(device.ensure(5 * CS, 10, Priority.DEMAND))
        hot = asyncio.ensure_future(device.ensure_runs([9, 10], Priority.PREFETCH, 8))
        await device.pull_run(0, 12)
        for _ in range(10):
            await asyncio.sleep(0)
        assert not fault.done() and not hot.done()
        gate.set()
        await asyncio.gather(whole, fault, hot)

    run(main())
    assert source.calls == [
        Call("disk", 0, 8, Priority.DEMAND),
        Call("disk", 8, 4, Priority.DEMAND),
    ]
    assert device.read(0, 12 * CS) == BIG and device.fetched_bytes == 12 * CS


def test_a_demand_run_overtakes_a_prefetch_run(tmp_path: Path) -> None:
    source = FakeSource({"disk": BIG})
    device = remote_device(tmp_path, source)

    async def main() -> None:
        gate = source.hold[Priority.PREFETCH] = asyncio.Event()
        hot = asyncio.ensure_future(device.ensure_runs([2, 3, 4, 5], Priority.PREFETCH, 8))
        await until(lambda: len(source.calls) == 1)
        await asyncio.wait_for(device.ensure_runs([0, 1, 2, 3], Priority.DEMAND, 8), 1)
        assert not hot.done()
        gate.set()
        await hot

    run(main())
    assert source.calls == [
        Call("disk", 2, 4, Priority.PREFETCH),
        Call("disk", 0, 4, Priority.DEMAND),
    ]
    assert device.read(0, 6 * CS) == BIG[: 6 * CS]


def test_one_bad_chunk_fails_only_itself_not_its_run(tmp_path: Path) -> None:
    source = FakeSource({"disk": BIG})
    device = remote_device(tmp_path, source)
    source.fail.add(("disk", 6))

    async def main() -> None:
        gate = source.hold[Priority.DEMAND] = asyncio.Event()
        whole = asyncio.ensure_future(device.ensure_runs(list(range(4, 8)), Priority.DEMAND, 8))
        await until(lambda: len(source.calls) == 1)
        # Faults on chunks of the run: 4 came before the bad one, 7 after it.
        faults = [asyncio.ensure_future(device.ensure(i * CS, 1, Priority.DEMAND)) for i in (4, 7)]
        bad = asyncio.ensure_future(device.ensure(6 * CS, 1, Priority.DEMAND))
        gate.set()
        await raises(whole, DrafterError)
        await asyncio.gather(*faults)
        await raises(bad, DrafterError)

    run(main())
    # The run, then each chunk it left missing on its own; only chunk 6 stays missing.
    assert source.calls == [
        Call("disk", 4, 4, Priority.DEMAND),
        Call("disk", 6, 1, Priority.DEMAND),
        Call("disk", 7, 1, Priority.DEMAND),
    ]
    assert device.missing() == [0, 1, 2, 3, 6, 8, 9, 10, 11] and not device._inflight


def test_a_chunk_listed_twice_is_asked_for_once(tmp_path: Path) -> None:
    source = FakeSource({"disk": BIG})
    device = remote_device(tmp_path, source)
    run(device.ensure_runs([5, 6, 5, 7], Priority.PREFETCH, 8))
    assert source.calls == [Call("disk", 5, 3, Priority.PREFETCH)]  # the repeat is skipped


def test_demand_then_prefetch_in_one_step_fetch_once(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)

    async def main() -> None:
        demand = asyncio.ensure_future(device.ensure(0, 1, Priority.DEMAND))
        prefetch = asyncio.ensure_future(device.ensure_chunk(0, Priority.PREFETCH))
        await asyncio.gather(demand, prefetch)

    run(main())
    assert source.calls == [Call("disk", 0, 1, Priority.DEMAND)]


def test_first_demand_at_only_for_demand(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)
    run(device.ensure(0, 1, Priority.PREFETCH))
    run(device.pull_run(1, 1))
    assert device.first_demand_at is None
    run(device.ensure(2 * CS, 1, Priority.DEMAND))
    assert device.first_demand_at is not None


# -- expect ---------------------------------------------------------------------------


def test_expect_makes_zero_chunks_local_without_fetching(tmp_path: Path) -> None:
    data = DATA[:CS] + bytes(CS) + DATA[2 * CS : 3 * CS] + bytes(1000)
    source = FakeSource({"memory": data})
    assert source.hashes["memory"][1] == ZERO_HASH == source.hashes["memory"][3]
    device = remote_device(tmp_path, source, "memory")
    assert device.missing() == [0, 2]
    assert device.missing_bytes() == 2 * CS
    assert device.read(CS, CS) == bytes(CS)
    assert device.read(3 * CS, 1000) == bytes(1000)
    run(device.ensure(0, SIZE, Priority.DEMAND))
    assert sorted(c.start for c in source.calls) == [0, 2]
    assert device.read(0, SIZE) == data
    assert device.fetched_bytes == 2 * CS


def test_expect_rejects_a_wrong_hash_count(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source, expect=False)
    hashes = source.hashes["disk"]
    with pytest.raises(DrafterError, match="3 hashes for 4 chunks"):
        device.expect(hashes[:3])
    with pytest.raises(DrafterError, match="5 hashes for 4 chunks"):
        device.expect([*hashes, ZERO_HASH])
    assert device.hashes == [None] * 4


def test_expect_keeps_local_chunks(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)
    run(device.ensure(0, 1, Priority.DEMAND))
    device.expect([ZERO_HASH] * 4)  # chunk 0 stays what was fetched
    assert device.read(0, CS) == DATA[:CS]
    assert device.hashes[0] == source.hashes["disk"][0]


# -- failures -------------------------------------------------------------------------


def test_wrong_size_delivery_raises_and_leaves_the_chunk_missing(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    source.wrong_size.add(("disk", 1))
    device = remote_device(tmp_path, source)
    with pytest.raises(DrafterError, match="wrong size"):
        run(device.ensure(CS, 1, Priority.DEMAND))
    assert device.local[1] == 0 and 1 in device.missing()
    assert device.fetched_bytes == 0
    with pytest.raises(MissingChunkError):
        device.read(CS, 1)
    with pytest.raises(DrafterError, match="wrong size"):
        run(device.pull_run(1, 1))
    assert device.local[1] == 0


def test_failed_fetch_raises_and_a_later_ensure_tries_again(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    source.fail_once.add(("disk", 2))
    device = remote_device(tmp_path, source)

    async def main() -> None:
        error = await raises(device.ensure(2 * CS, 1, Priority.DEMAND), DrafterError)
        assert not isinstance(error, MissingChunkError)
        assert device.missing() == [0, 1, 2, 3]
        assert device._inflight == {}  # nothing left behind in flight
        await device.ensure(2 * CS, 1, Priority.DEMAND)

    run(main())
    assert source.calls == [Call("disk", 2, 1, Priority.DEMAND)] * 2
    assert device.read(2 * CS, CS) == DATA[2 * CS : 3 * CS]


def test_every_waiter_of_a_failed_fetch_sees_the_error(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    source.fail.add(("disk", 0))
    device = remote_device(tmp_path, source)

    async def main() -> list[BaseException | None]:
        waiters = [device.ensure(0, 1, Priority.DEMAND) for _ in range(3)]
        results = await asyncio.gather(*waiters, return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    errors = run(main())
    assert all(isinstance(e, DrafterError) for e in errors)
    assert len(source.calls) == 1
    assert device.local[0] == 0


# -- background pull ------------------------------------------------------------------


def test_pull_run_asks_once_per_stretch_of_chunks_neither_local_nor_in_flight(
    tmp_path: Path,
) -> None:
    data = pattern(10 * CS)
    source = FakeSource({"disk": data})
    device = remote_device(tmp_path, source)

    async def main() -> None:
        await device.ensure(CS, 1, Priority.DEMAND)  # chunk 1 local
        await device.ensure(6 * CS, 1, Priority.DEMAND)  # chunk 6 local
        gate = source.hold[Priority.PREFETCH] = asyncio.Event()
        prefetch = asyncio.ensure_future(device.ensure_chunk(3, Priority.PREFETCH))
        await until(lambda: len(source.calls) == 3)
        source.calls.clear()
        source.expected.clear()
        await device.pull_run(0, 9)  # chunk 9 is not in the run
        gate.set()
        await prefetch

    run(main())
    assert source.calls == [
        Call("disk", 0, 1, Priority.BACKGROUND),
        Call("disk", 2, 1, Priority.BACKGROUND),
        Call("disk", 4, 2, Priority.BACKGROUND),
        Call("disk", 7, 2, Priority.BACKGROUND),
    ]
    assert [len(e) for e in source.expected] == [1, 1, 2, 2]
    assert device.missing() == [9]
    assert device.read(0, 9 * CS) == data[: 9 * CS]


def test_pull_run_asks_nothing_for_local_chunks(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)
    run(device.pull_run(0, 4))
    assert source.calls == [Call("disk", 0, 4, Priority.BACKGROUND)]
    run(device.pull_run(0, 4))
    assert len(source.calls) == 1
    assert device.read(0, SIZE) == DATA
    assert device.fetched_bytes == SIZE


# -- writes, dirty tracking -----------------------------------------------------------


def test_write_marks_chunks_dirty_and_records_whole_pages(tmp_path: Path) -> None:
    cs = 4 * 4096  # four pages a chunk
    data = pattern(2 * cs + 5000)  # three chunks, the last of two pages (one short)
    device = local_device(tmp_path, data, chunk_size=cs)
    assert device.page == 4096
    device.write(5000, b"a" * 100)  # chunk 0, page 1
    device.write(8000, b"b" * 300)  # chunk 0, pages 1 and 2
    device.write(cs - 1, b"cc")  # chunk 0 page 3, chunk 1 page 0
    device.write(2 * cs + 4500, b"d")  # chunk 2, its short second page
    assert device.dirty == {0, 1, 2}
    runs = device.take_dirty_runs()
    assert runs == {
        0: [(4096, 3 * 4096)],
        1: [(0, 4096)],
        2: [(4096, 5000 - 4096)],
    }
    assert device.take_dirty_runs() == {}  # reset
    assert device.dirty == set() and device.dirty_pages == {}
    chunk0 = device.read_runs(0, runs[0])
    assert chunk0 == [(4096, device.read(4096, 3 * 4096))]
    assert chunk0[0][1][5000 - 4096 : 5100 - 4096] == b"a" * 100


def test_separate_pages_make_separate_runs(tmp_path: Path) -> None:
    cs = 4 * 4096
    device = local_device(tmp_path, pattern(cs), chunk_size=cs)
    device.write(10, b"x")
    device.write(3 * 4096 + 10, b"y")
    assert device.take_dirty_runs() == {0: [(0, 4096), (3 * 4096, 4096)]}
    device.write(0, b"z")
    assert device.take_dirty() == {0}
    assert device.take_dirty_runs() == {}


def test_chunk_size_not_a_whole_number_of_pages_is_tracked_whole(tmp_path: Path) -> None:
    device = local_device(tmp_path, pattern(3000), chunk_size=1000)
    assert device.page == 1000
    device.write(1500, b"q")
    assert device.take_dirty_runs() == {1: [(0, 1000)]}


def test_partial_write_of_missing_chunk_raises_whole_write_does_not(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)
    with pytest.raises(MissingChunkError):
        device.write(CS + 1, b"x" * (CS - 1))  # all of chunk 1 but its first byte
    assert device.local[1] == 0 and device.dirty == set()
    device.write(CS, b"w" * CS)  # chunk 1 whole
    device.write(3 * CS, b"v" * 1000)  # the short last chunk whole
    assert device.read(CS, CS) == b"w" * CS
    assert device.read(3 * CS, 1000) == b"v" * 1000
    assert device.dirty == {1, 3}
    assert device.hashes[1] is None and device.hashes[3] is None
    assert device.hashes[0] == source.hashes["disk"][0]
    assert device.missing() == [0, 2]
    assert source.calls == []
    device.write(CS + 10, b"p")  # local now: a partial write is fine
    assert device.read(CS + 9, 3) == b"wpw"


def test_whole_write_while_a_fetch_is_in_flight_wins(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)

    async def main() -> None:
        gate = source.hold[Priority.DEMAND] = asyncio.Event()
        fetch = asyncio.ensure_future(device.ensure(0, 1, Priority.DEMAND))
        await until(lambda: len(source.calls) == 1)
        device.write(0, b"n" * CS)
        gate.set()
        await fetch

    run(main())
    assert device.read(0, CS) == b"n" * CS  # the fetched copy did not overwrite it
    assert device.fetched_bytes == 0


def test_failed_write_leaves_no_chunk_half_done(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)
    with pytest.raises(MissingChunkError):
        device.write(0, b"x" * (CS + 10))  # chunk 0 whole, chunk 1 only in part
    assert device.local[0] == 0, "chunk 0 is marked local though nothing was written"
    assert device.dirty == set()


# -- invalidate, patch ----------------------------------------------------------------


def test_invalidate_makes_chunks_missing_and_not_dirty(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)
    run(device.ensure(0, SIZE, Priority.DEMAND))
    device.write(10, b"x")
    device.write(CS + 10, b"y")
    assert device.dirty == {0, 1}
    device.invalidate([1, 2])
    assert device.missing() == [1, 2]
    assert device.dirty == {0} and set(device.dirty_pages) == {0}
    assert device.hashes[1] is None and device.hashes[2] is None
    with pytest.raises(MissingChunkError):
        device.read(2 * CS, 1)
    assert device.take_dirty_runs() == {0: [(0, CS)]}
    source.calls.clear()
    run(device.ensure(0, SIZE, Priority.DEMAND))  # fetched again
    assert sorted(c.start for c in source.calls) == [1, 2]
    assert device.read(CS, 2 * CS) == DATA[CS : 3 * CS]
    with pytest.raises(DrafterError):
        device.invalidate([4])
    with pytest.raises(DrafterError):
        device.invalidate([-1])


def test_invalidate_without_a_source_is_refused(tmp_path: Path) -> None:
    device = local_device(tmp_path, DATA)
    with pytest.raises(DrafterError):
        device.invalidate([0])


def test_patch_writes_runs_into_a_local_chunk_and_forgets_its_hash(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)
    run(device.ensure(CS, 1, Priority.DEMAND))
    assert device.hashes[1] == source.hashes["disk"][1]
    device.patch(1, [(0, b"ab"), (100, b"cd")])
    expected = bytearray(DATA[CS : 2 * CS])
    expected[0:2] = b"ab"
    expected[100:102] = b"cd"
    assert device.read(CS, CS) == bytes(expected)
    assert device.read_chunk(1) == (bytes(expected), None)
    assert device.dirty == set()  # a patch is the remote's change, not a write here
    with pytest.raises(MissingChunkError):
        device.patch(0, [(0, b"x")])
    with pytest.raises(DrafterError, match="beyond"):
        device.patch(1, [(CS - 1, b"xy")])
    run(device.ensure(3 * CS, 1, Priority.DEMAND))
    with pytest.raises(DrafterError, match="beyond"):
        device.patch(3, [(999, b"xy")])  # the short last chunk


def test_fill_makes_a_chunk_local(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)
    with pytest.raises(DrafterError, match="wrong size"):
        device.fill(3, DATA[3 * CS :] + b"x", None)
    device.fill(3, DATA[3 * CS :], None)
    assert device.read(3 * CS, 1000) == DATA[3 * CS :]
    assert device.hashes[3] is None
    device.fill(3, bytes(1000), ZERO_HASH)  # local already: ignored
    assert device.read(3 * CS, 1000) == DATA[3 * CS :]


# -- copy_to, recording, accounting, binding -------------------------------------------


def _holes_supported(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    with probe.open("wb") as f:
        f.truncate(4 * CS)
        f.seek(2 * CS)
        f.write(b"x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) == 0
    finally:
        os.close(fd)


def _data_blocks(path: Path, size: int) -> list[int]:
    """The CS-blocks of ``path`` that hold data (not holes)."""
    fd = os.open(path, os.O_RDONLY)
    blocks: list[int] = []
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            blocks.extend(range(data // CS, -(-hole // CS)))
            pos = hole
    finally:
        os.close(fd)
    return blocks


def test_copy_to_writes_base_plus_overlay_keeping_holes(tmp_path: Path) -> None:
    # Base: chunk 0 data, chunk 1 a hole, chunk 2 data, chunk 3 (short) data.
    base = tmp_path / "base"
    with base.open("wb") as f:
        f.write(DATA[:CS])
        f.seek(2 * CS)
        f.write(DATA[2 * CS :])
    device = Device("disk", SIZE, FileRange.whole(base), tmp_path / "overlay", chunk_size=CS)
    device.write(2 * CS + 5, b"new")  # chunk 2 into the overlay, the rest from base
    device.write(3 * CS, bytes(1000))  # chunk 3 zeros in the overlay: no longer base's
    expected = bytearray(base.read_bytes())
    expected[2 * CS + 5 : 2 * CS + 8] = b"new"
    expected[3 * CS :] = bytes(1000)

    out = tmp_path / "out"
    offset = 2 * CS
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, offset + SIZE)
        device.copy_to(fd, offset)
    finally:
        os.close(fd)
    assert out.read_bytes() == bytes(offset) + bytes(expected)
    assert device.read(0, SIZE) == bytes(expected)
    if _holes_supported(tmp_path):
        blocks = _data_blocks(out, offset + SIZE)
        assert 2 in blocks and 4 in blocks  # chunks 0 and 2
        assert 3 not in blocks  # chunk 1: a hole in the base stays a hole
        assert 0 not in blocks and 1 not in blocks  # before dst_offset: untouched


def test_copy_to_of_a_fetched_device(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)
    run(device.ensure(0, SIZE, Priority.DEMAND))
    out = tmp_path / "out"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, SIZE)
        device.copy_to(fd, 0)
    finally:
        os.close(fd)
    assert out.read_bytes() == DATA


def test_recording_keeps_chunks_in_first_read_order(tmp_path: Path) -> None:
    device = local_device(tmp_path, DATA)
    device.read(0, 1)  # not recording yet
    device.recording = {}
    device.read(2 * CS + 7, 1)
    device.read(CS - 1, 2)  # chunks 0 and 1
    device.read(2 * CS, 10)  # again: keeps its place
    assert device.recorded() == [2, 0, 1]
    device.read(SIZE - 1, 1)
    assert device.stop_recording() == [2, 0, 1, 3]
    assert device.recording is None
    device.read(0, SIZE)
    assert device.recorded() == []
    assert device.stop_recording() == []


def test_fetched_bytes_counts_what_was_fetched(tmp_path: Path) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source)
    run(device.ensure(3 * CS, 1, Priority.DEMAND))
    assert device.fetched_bytes == 1000  # the short last chunk
    run(device.pull_run(0, 4))
    assert device.fetched_bytes == SIZE
    assert device.missing_bytes() == 0


@pytest.mark.parametrize("binding", [True, False])
def test_binding_passes_the_manifest_hash_or_none(tmp_path: Path, binding: bool) -> None:
    source = FakeSource({"disk": DATA})
    device = remote_device(tmp_path, source, binding=binding)
    assert device.binding is binding
    run(device.ensure(CS, 1, Priority.DEMAND))
    run(device.pull_run(2, 2))
    hashes = source.hashes["disk"]
    if binding:
        assert source.expected == [[hashes[1]], [hashes[2], hashes[3]]]
    else:
        assert source.expected == [[None], [None, None]]
    # Either way the device keeps the hash of what it received.
    assert device.hashes[1:] == hashes[1:]
    assert device.hashes[1] == digest(DATA[CS : 2 * CS])
