"""A package read by range from an HTTP object server (tests/support/hostile_http.py):
the good path, and every way the store can lie. The VM never sees a wrong byte: a
fetch either delivers chunks that match the index or fails with one line."""

from __future__ import annotations

import asyncio
import os
import tarfile
import time
from pathlib import Path

import pytest

from drafter.chunks import ZERO_HASH, Priority
from drafter.errors import DrafterError
from drafter.index import index_key
from drafter.objects import ObjectChanged, ObjectSource, StoreError, StoreOptions
from drafter.objects.slots import FLOOR, Budget, RequestSlots
from drafter.package import PackageConfig, open_package, write_package
from drafter.transport.inflight import VerificationError
from support.hostile_http import Fault, HostileServer

MIB = 1 << 20
TOKEN = "drft1_biSHlX-mFo3kcSufZM_YXyRgtnngOLiM8Wqn0Zyh3a1sF3Wk"  # as drafter-token makes them
FAST = StoreOptions(retry_timeout=1.0, request_timeout=2.0)


def make_package(directory: Path, key: bytes | None = None, pack: bool = True) -> Path:
    """4 MiB of memory (random, zeros, random), a small state, kernel and disk. The
    random chunks do not compress; the last ones (zeros, then random) do: with
    ``pack``, those come from the pack."""
    files = {}
    for name, size in (("state", 70_000), ("memory", 4 * MIB), ("kernel", 300_000),
                       ("initramfs", 100_000), ("disk", 2 * MIB)):  # fmt: skip
        path = directory / name
        with path.open("wb") as f:
            f.truncate(size)
            if name != "disk":
                f.write(os.urandom(min(size, MIB)))
                f.seek(size - 1000)
                f.write(os.urandom(1000))
        files[name] = path
    pkg = directory / "p.drft"
    config = PackageConfig(4, 1, "console=ttyS0", "02:00:00:00:00:01")
    hot = {"memory": [(0, 4096), (3 * MIB, 8192)]}
    write_package(pkg, config, files, hot, key, pack=pack)  # type: ignore[arg-type]
    return pkg


@pytest.fixture
def server():
    with HostileServer() as s:
        yield s


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return make_package(tmp_path)


def url(server: HostileServer) -> str:
    return server.url + "p.drft"


async def fetch_all(source: ObjectSource) -> dict[str, bytes]:
    out = {}
    for resource, size in source.manifest.items():
        buf = bytearray(size)
        count = len(source.hashes[resource])

        def keep(index: int, data, digest: bytes, buf=buf) -> None:  # noqa: ANN001
            at = index * source.chunk_size
            buf[at : at + len(data)] = data

        await source.fetch_run(resource, 0, count, Priority.BACKGROUND, [None] * count, keep)
        out[resource] = bytes(buf)
    return out


def member_bytes(path: Path) -> dict[str, bytes]:
    pkg = open_package(path)
    return {r: pkg.read(r) for r in pkg.members if r != "config"}


def test_lazy_reads_match_the_package_and_skip_zero_chunks(server, package) -> None:
    server.put("p.drft", package.read_bytes())

    async def go() -> tuple[ObjectSource, dict[str, bytes], int]:
        source = ObjectSource(url(server), options=FAST)
        await source.connect()
        connect_requests = source.requests
        return source, await fetch_all(source), connect_requests

    source, got, connect_requests = asyncio.run(go())
    assert connect_requests <= 2  # the index and config: one or two range requests
    assert [r[0] for r in server.requests].count("HEAD") == 0  # the first GET tells the size
    assert got == member_bytes(package)
    assert source.config == open_package(package).read("config")
    assert source.hot == {"memory": [0, 12]}
    zero = sum(h == ZERO_HASH for hashes in source.hashes.values() for h in hashes)
    assert zero > 0 and source.stats.zero_chunks == zero
    # every GET is a range, and each after the first is pinned to the object's ETag
    assert all(r[2] for r in server.requests if r[0] == "GET")
    assert all(h.get("if-match") == server.etag("p.drft") for h in server.headers[1:])


def test_a_flipped_byte_in_a_chunk_is_refused(server, tmp_path) -> None:
    package = make_package(tmp_path, pack=False)  # the chunk comes from its member
    pkg = open_package(package)
    server.put("p.drft", package.read_bytes())
    where = pkg.members["memory"].offset + 4 * MIB - 500  # in chunk 15 of memory
    server.fault(Fault.FLIP_BYTE, offset=where)

    async def go() -> None:
        source = ObjectSource(url(server), options=FAST)
        await source.connect()
        got: list[int] = []
        await source.fetch_run("memory", 0, 4, Priority.DEMAND, [None] * 4,
                               lambda i, d, h: got.append(i))  # fmt: skip
        assert got == [0, 1, 2, 3]
        with pytest.raises(VerificationError, match="chunk 15 of memory"):
            await source.fetch_run("memory", 15, 1, Priority.DEMAND, [None],
                                   lambda i, d, h: got.append(i))  # fmt: skip
        assert got == [0, 1, 2, 3]

    asyncio.run(go())


def _flip_in_index(package: Path, at: int) -> bytes:
    data = bytearray(package.read_bytes())
    index = open_package(package).index
    assert index is not None
    data[index.offset + (at if at >= 0 else index.size + at)] ^= 0x01
    return bytes(data)


def test_a_changed_index_is_refused(server, package, tmp_path) -> None:
    server.put("p.drft", _flip_in_index(package, -40))  # in the last hash

    async def go() -> None:
        with pytest.raises(DrafterError, match="index is damaged"):
            await ObjectSource(url(server), options=FAST).connect()

    asyncio.run(go())


def test_a_signed_index_needs_its_token_and_a_forger_cannot_reseal(server, tmp_path) -> None:
    key = index_key(TOKEN)
    signed = make_package(tmp_path, key)
    server.put("p.drft", signed.read_bytes())

    async def connect(**kw) -> ObjectSource:  # noqa: ANN003
        source = ObjectSource(url(server), options=FAST, **kw)
        await source.connect()
        return source

    asyncio.run(connect(key=key))
    with pytest.raises(DrafterError, match="signed: give its token"):
        asyncio.run(connect())
    with pytest.raises(DrafterError, match="MAC does not check"):
        asyncio.run(connect(key=index_key(TOKEN + "x")))
    # a store that rewrites the package without the token (its digest sealed unkeyed)
    (tmp_path / "forged").mkdir()
    forged = make_package(tmp_path / "forged")
    server.put("p.drft", forged.read_bytes())
    with pytest.raises(DrafterError, match="MAC does not check"):
        asyncio.run(connect(key=key))


def test_the_index_digest_pin(server, package) -> None:
    server.put("p.drft", package.read_bytes())
    digest = bytes.fromhex(open_package(package).index_digest())

    async def connect(pin: bytes) -> None:
        await ObjectSource(url(server), options=FAST, pin=pin).connect()

    asyncio.run(connect(digest))
    with pytest.raises(DrafterError, match="pinned digest"):
        asyncio.run(connect(bytes(32)))


@pytest.mark.parametrize(
    ("fault", "match"),
    [
        (Fault.WHOLE_OBJECT, "cannot read"),  # a 200 with the whole object to a range
        (Fault.TRUNCATE, "cannot read"),  # a body cut short, every time
        (Fault.WRONG_LENGTH, "cannot read|answered bytes"),
        (Fault.UNAVAILABLE, "cannot read"),  # 503 SlowDown for ever: retried, then fails
    ],
)
def test_a_lying_or_failing_store_fails_the_fetch_in_one_line(
    server, package, fault, match
) -> None:
    server.put("p.drft", package.read_bytes())

    async def go() -> None:
        source = ObjectSource(url(server), options=FAST)
        await source.connect()
        server.fault(fault)
        got: list[int] = []
        start = time.monotonic()
        with pytest.raises(StoreError, match=match) as e:
            await source.fetch_run("memory", 0, 4, Priority.DEMAND, [None] * 4,
                                   lambda i, d, h: got.append(i))  # fmt: skip
        assert got == []  # nothing was delivered
        assert "\n" not in str(e.value)
        assert time.monotonic() - start < 10

    asyncio.run(go())


@pytest.mark.parametrize(
    "fault", [Fault.WHOLE_OBJECT, Fault.TRUNCATE, Fault.WRONG_LENGTH, Fault.UNAVAILABLE]
)
def test_the_first_read_is_checked_as_every_other(server, package, fault) -> None:
    """The first range read also gives the object's size and ETag (there is no HEAD):
    a store that lies or fails there fails the connect in one line."""
    server.put("p.drft", package.read_bytes())
    server.fault(fault)
    with pytest.raises(StoreError) as e:
        asyncio.run(ObjectSource(url(server), options=FAST).connect())
    assert "\n" not in str(e.value)


def test_an_object_replaced_mid_start_is_never_mixed(server, package) -> None:
    server.put("p.drft", package.read_bytes())

    async def go() -> None:
        source = ObjectSource(url(server), options=FAST)
        await source.connect()
        server.put("p.drft", package.read_bytes()[:-10240] + bytes(10240))  # a new ETag
        with pytest.raises(ObjectChanged, match="replaced"):
            await source.fetch_run("memory", 0, 1, Priority.DEMAND, [None],
                                   lambda i, d, h: None)  # fmt: skip

    asyncio.run(go())


def test_unknown_object_and_not_a_package(server, tmp_path) -> None:
    server.put("junk", os.urandom(10000))

    async def connect(path: str) -> None:
        await ObjectSource(server.url + path, options=FAST).connect()

    with pytest.raises(StoreError, match="does not exist"):
        asyncio.run(connect("nothing-here"))
    with pytest.raises(DrafterError, match="not a drafter package"):
        asyncio.run(connect("junk"))


def test_an_older_package_names_the_command_that_adds_an_index(server, tmp_path) -> None:
    old = tmp_path / "old.drft"
    with tarfile.open(old, "w") as tar:
        for name in ("config", "state", "memory", "kernel", "initramfs", "disk"):
            path = tmp_path / name
            path.write_bytes(b"x" * 100)
            tar.add(path, arcname=f"drafter.drft{name}")
    server.put("old.drft", old.read_bytes())
    with pytest.raises(DrafterError, match="drafter-packager --add-index"):
        asyncio.run(ObjectSource(server.url + "old.drft", options=FAST).connect())


def test_slots_go_in_priority_order() -> None:
    async def go() -> list[int]:
        slots = RequestSlots(1)
        order: list[int] = []
        await slots.take(Priority.BACKGROUND, 1)  # the one slot is busy

        async def wait(p: int) -> None:
            async with slots.slot(p, 1):
                order.append(p)

        tasks = [asyncio.ensure_future(wait(p)) for p in
                 (Priority.BACKGROUND, Priority.PREFETCH, Priority.DEMAND)]  # fmt: skip
        await asyncio.sleep(0)
        slots.give(Priority.BACKGROUND, 1)
        await asyncio.gather(*tasks)
        assert slots.busy == 0 and slots.queued_bytes == 0
        return order

    assert asyncio.run(go()) == [Priority.DEMAND, Priority.PREFETCH, Priority.BACKGROUND]


def test_background_bytes_in_flight_stay_within_the_budget_demand_goes_past() -> None:
    MiB = 1 << 20

    async def go() -> None:
        slots = RequestSlots(32, budget=10 * MiB)
        held: list[asyncio.Event] = []
        started: list[str] = []

        async def fetch(name: str, priority: int, nbytes: int) -> None:
            gate = asyncio.Event()
            held.append(gate)
            async with slots.slot(priority, nbytes):
                started.append(name)
                await gate.wait()

        tasks = [asyncio.ensure_future(fetch(f"bg{i}", Priority.BACKGROUND, 4 * MiB))
                 for i in range(5)]  # fmt: skip
        await asyncio.sleep(0)
        assert started == ["bg0", "bg1"] and slots.queued_bytes == 8 * MiB
        # A demand does not wait behind the budget; a prefetch goes before the rest.
        tasks.append(asyncio.ensure_future(fetch("demand", Priority.DEMAND, 256 << 10)))
        tasks.append(asyncio.ensure_future(fetch("hot", Priority.PREFETCH, 4 * MiB)))
        await asyncio.sleep(0)
        assert started == ["bg0", "bg1", "demand"]
        held[0].set()  # bg0 done: 4 MiB free, the prefetch fits
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert started == ["bg0", "bg1", "demand", "hot"]
        # A request larger than the whole budget still goes once nothing else is queued.
        tasks.append(asyncio.ensure_future(fetch("huge", Priority.BACKGROUND, 64 * MiB)))
        for gate in held:
            gate.set()
        while len(started) < 8:
            await asyncio.sleep(0)
            for gate in held:
                gate.set()
        await asyncio.gather(*tasks)
        assert started[-1] == "huge" and slots.busy == 0 and slots.queued_bytes == 0

    asyncio.run(go())


def test_the_budget_follows_the_bandwidth_delay_product() -> None:
    budget = Budget()
    assert budget.bytes() == FLOOR  # nothing measured yet
    budget.arrived(0, 0.1, now=0.0)  # a HEAD: 100 ms round trip
    for i in range(1, 41):  # 4 MiB every 20 ms: 200 MiB/s
        budget.arrived(4 << 20, 0.15, now=i * 0.02)
    assert budget.rtt == 0.1
    assert 190 << 20 < budget.rate() < 215 << 20
    assert 38 << 20 < budget.bytes() < 43 << 20  # 2 x 200 MiB/s x 0.1 s
    fast = Budget()
    fast.arrived(0, 0.0005, now=0.0)  # loopback: the floor
    for i in range(1, 41):
        fast.arrived(4 << 20, 0.01, now=i * 0.02)
    assert fast.bytes() == FLOOR


def test_a_running_vms_fetch_waits_out_a_store_outage(server, package, monkeypatch) -> None:
    """After the resume (keep_trying) a store that stays away past the client's retries
    stalls the fetch instead of failing the VM's reads; it completes once the store is
    back. A lasting refusal still fails at once."""
    monkeypatch.setattr("drafter.objects.source.OUTAGE_BACKOFF", (0.2, 0.5))
    server.put("p.drft", package.read_bytes())
    want = member_bytes(package)["memory"]

    async def go() -> None:
        source = ObjectSource(url(server), options=FAST)
        await source.connect()
        source.keep_trying = True
        server.fault(Fault.UNAVAILABLE)
        got: dict[int, bytes] = {}
        fetch = asyncio.ensure_future(
            source.fetch_run(
                "memory",
                0,
                4,
                Priority.DEMAND,
                [None] * 4,
                lambda i, d, h: got.__setitem__(i, bytes(d)),
            )  # fmt: skip
        )
        await asyncio.sleep(4)  # several times the client's own 1 s of retries
        assert not fetch.done() and got == {}
        assert source.outages == 1
        served = server.gets()
        server.fault(Fault.NONE)
        await asyncio.wait_for(fetch, 10)
        assert b"".join(got[i] for i in range(4)) == want[: 4 * source.chunk_size]
        assert served > 3  # it kept asking during the outage
        server.fault(Fault.REPLACE)
        with pytest.raises(ObjectChanged):
            await asyncio.wait_for(
                source.fetch_run("memory", 15, 1, Priority.DEMAND, [None], lambda i, d, h: None),
                10,
            )

    asyncio.run(go())
