"""The lease (src/drafter/checkpoint/lease.py) as a state machine, on records in
memory and simulated time (tests/support/records.py), then on a real SeaweedFS.

The property everything rests on: at no instant do two holders both consider
themselves valid, whatever the store does to either (partitions, lost answers)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import pytest

from drafter.checkpoint import Lease, LeaseFenced, LeasePhase, LeaseRecord, ObjectRecords
from drafter.checkpoint.lease import LEASE, MARGIN
from drafter.checkpoint.records import RecordConflict
from drafter.errors import DrafterError
from support.records import FakeTime, MemoryRecords, MemoryStore

D = 15.0  # the lease time


def lease(store: MemoryStore, name: str, time: FakeTime) -> tuple[Lease, MemoryRecords]:
    records = store.view(name)
    return Lease(records, name, D, clock=time.clock, sleep=time.sleep), records


def run(body: Callable[[FakeTime], Awaitable[None]]) -> None:
    asyncio.run(body(FakeTime()))


def test_a_fresh_lease_is_epoch_1_and_a_second_holder_is_told_who_holds_it() -> None:
    async def go(time: FakeTime) -> None:
        store = MemoryStore()
        a, _ = lease(store, "a", time)
        assert await a.acquire() == 1 and a.valid()
        b, _ = lease(store, "b", time)
        with pytest.raises(DrafterError, match="held by a .epoch 1."):
            await b.acquire(may_wait=False)
        assert b.phase is LeasePhase.UNHELD

    run(go)


def test_a_renewing_holder_is_never_taken_over_and_a_dead_one_is_after_a_lease_time() -> None:
    async def go(time: FakeTime) -> None:
        store = MemoryStore()
        a, _ = lease(store, "a", time)
        await a.acquire()
        keeping = asyncio.ensure_future(a.keep())
        b, _ = lease(store, "b", time)
        taking = asyncio.ensure_future(b.acquire())
        await time.run(until=20 * D)
        assert not taking.done() and a.valid()  # twenty lease times: still a's
        keeping.cancel()  # a dies: no more renewals
        died = time.now
        last_deadline = a.deadline
        await time.run(until=died + 3 * D, done=taking)
        assert taking.done() and taking.result() == 2
        took = time.now
        assert took >= died + D  # a whole lease time after a's last renewal was seen
        assert last_deadline <= took - MARGIN * D  # a had stopped well before

    run(go)


def test_a_partitioned_holder_expires_before_the_take_over_and_is_fenced_after() -> None:
    async def go(time: FakeTime) -> None:
        store = MemoryStore()
        a, a_view = lease(store, "a", time)
        await a.acquire()
        phases: list[tuple[float, LeasePhase]] = []
        keeping = asyncio.ensure_future(a.keep(lambda p: phases.append((time.now, p))))
        await time.run(until=2 * D)
        a_view.away = True  # a loses the store; b does not
        cut = time.now
        b, _ = lease(store, "b", time)
        taking = asyncio.ensure_future(b.acquire())
        await time.run(until=cut + 5 * D, done=taking)
        assert taking.result() == 2
        took = time.now
        expired_at = next(t for t, p in phases if p is LeasePhase.EXPIRED)
        assert expired_at <= cut + (1 - MARGIN) * D + 1e-9  # a paused in time
        assert expired_at < took
        assert not a.valid()
        with pytest.raises(LeaseFenced, match="expired"):
            a.check()
        a_view.away = False  # the cut heals: a's next renewal fails its condition
        await time.run(until=took + D, done=keeping)
        assert keeping.result() is LeasePhase.FENCED
        assert phases[-1][1] is LeasePhase.FENCED
        writes_by_a = [w for w in store.writes if w[0] == "a"]
        record = LeaseRecord.parse(store.objects[LEASE][0], "")
        assert record.holder == "b" and record.epoch == 2
        await time.run(until=time.now + 10 * D)
        assert [w for w in store.writes if w[0] == "a"] == writes_by_a  # nothing more

    run(go)


def test_a_short_outage_expires_and_then_recovers_if_nobody_took_it() -> None:
    async def go(time: FakeTime) -> None:
        store = MemoryStore()
        a, a_view = lease(store, "a", time)
        await a.acquire()
        phases: list[LeasePhase] = []
        keeping = asyncio.ensure_future(a.keep(phases.append))
        a_view.away = True
        await time.run(until=D)
        assert phases == [LeasePhase.EXPIRED] and not a.valid()
        a_view.away = False
        await time.run(until=2 * D)
        assert phases == [LeasePhase.EXPIRED, LeasePhase.HOLDING] and a.valid()
        keeping.cancel()

    run(go)


def test_release_and_hand_over() -> None:
    async def go(time: FakeTime) -> None:
        store = MemoryStore()
        a, _ = lease(store, "a", time)
        await a.acquire()
        await a.release()
        b, _ = lease(store, "b", time)
        assert await b.acquire(may_wait=False) == 2  # at once
        await b.hand_over("dest")
        c, _ = lease(store, "c", time)
        with pytest.raises(DrafterError, match="held by b"):
            await c.acquire(may_wait=False)  # handed to someone else
        dest, _ = lease(store, "dest", time)
        assert await dest.acquire(may_wait=False, handed_to="dest") == 3

    run(go)


def test_a_renewal_whose_answer_was_lost_is_recognised_as_ours() -> None:
    async def go(time: FakeTime) -> None:
        store = MemoryStore()
        a, a_view = lease(store, "a", time)
        await a.acquire()
        real = a_view.replace

        async def lost_answer(name: str, data: bytes, version: str) -> str:
            await real(name, data, version)  # it lands ...
            raise TimeoutError  # ... but the answer is lost

        a_view.replace = lost_answer  # type: ignore[method-assign]
        assert await a.renew() is LeasePhase.HOLDING
        a_view.replace = real  # type: ignore[method-assign]
        assert await a.renew() is LeasePhase.HOLDING  # not FENCED by its own write
        assert a.valid()

    run(go)


def test_hostile_lease_records_are_refused_in_one_line() -> None:
    bad = [b"", b"[]", b"{}", b'{"epoch": true, "holder": "x", "duration": 15}',
           b'{"epoch": 1, "holder": "", "duration": 15}',
           b'{"epoch": 1, "holder": "x", "duration": 0.001}',
           b'{"epoch": -1, "holder": "x", "duration": 15}',
           b"[" * 100_000, b'{"epoch": 1, "holder": "x", "duration": 15, "released": 1}',
           b'{"epoch": 1, "holder": "' + b"x" * 300 + b'", "duration": 15}']  # fmt: skip
    for data in bad:
        with pytest.raises(DrafterError) as e:
            LeaseRecord.parse(data, "s3://b/p/")
        assert "\n" not in str(e.value)

    async def go(time: FakeTime) -> None:
        store = MemoryStore()
        store.objects[LEASE] = (b"not json", '"1"')
        a, _ = lease(store, "a", time)
        with pytest.raises(DrafterError, match="not a lease record"):
            await a.acquire()

    run(go)


@pytest.mark.parametrize("seed", range(6))
def test_never_two_valid_holders_under_random_partitions(seed: int) -> None:
    """Three would-be holders, each losing and regaining the store at random: at every
    step of simulated time at most one considers itself valid; every take-over
    raises the epoch."""
    rng = random.Random(seed)

    async def go(time: FakeTime) -> None:
        store = MemoryStore()
        holders = [lease(store, name, time) for name in "abc"]
        tasks: list[asyncio.Future[object]] = []

        async def life(le: Lease) -> None:
            await le.acquire()
            await le.keep()

        for le, _ in holders:
            tasks.append(asyncio.ensure_future(life(le)))
        epochs: list[int] = []
        step = 0.5
        while time.now < 60 * D:
            for _, view in holders:
                if rng.random() < 0.02:
                    view.away = not view.away
            await time.run(until=time.now + step)
            valid = [le.holder for le, _ in holders if le.valid()]
            assert len(valid) <= 1, (time.now, valid)
            held = [le.epoch for le, _ in holders if le.phase is LeasePhase.HOLDING]
            epochs.extend(held)
        assert len(set(epochs)) > 1  # the lease did move
        for task in tasks:
            task.cancel()

    run(go)


def test_object_records_and_a_lease_on_seaweedfs(seaweed, monkeypatch) -> None:
    """The same conditions on a real S3 store: create-if-absent, replace-if-version,
    and a lease taken over after its holder stopped renewing (2 s lease)."""
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    prefix = f"s3://drafter/lease-test-{random.randrange(1 << 30)}"

    async def go() -> None:
        records = ObjectRecords(prefix)
        version = await records.create("head", b"one")
        with pytest.raises(RecordConflict):
            await records.create("head", b"two")
        newer = await records.replace("head", b"three", version)
        with pytest.raises(RecordConflict):
            await records.replace("head", b"four", version)  # a stale version
        found = await records.read("head")
        assert found is not None and found.data == b"three" and found.version == newer
        assert await records.read("nothing") is None
        await records.put("chunks/ab", b"x")
        assert await records.list("chunks/") == ["chunks/ab"]
        a = Lease(ObjectRecords(prefix), "a", 2.0)
        assert await a.acquire() == 1
        b = Lease(ObjectRecords(prefix), "b", 2.0)
        started = asyncio.get_running_loop().time()
        assert await b.acquire() == 2  # a never renews
        assert asyncio.get_running_loop().time() - started >= 2.0
        assert await a.renew() is LeasePhase.FENCED
        with pytest.raises(LeaseFenced):
            a.check()

    asyncio.run(go())
