"""The run gate (src/drafter/checkpoint/running.py): the VM runs only while nobody
holds it paused, and a pause cut short is never left without a holder. QEMU and the
stable address are stand-ins that record what they were asked."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from drafter.checkpoint.running import RunGate


class Machine:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.slow = asyncio.Event()  # set: a pause takes until ``go``
        self.go = asyncio.Event()

    async def pause(self) -> None:
        self.calls.append("pause")  # QEMU stops at once; the answer may be slow
        if self.slow.is_set():
            await self.go.wait()

    async def resume(self) -> None:
        self.calls.append("resume")


class Follow:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def left(self) -> None:
        self.calls.append("left")

    def running(self) -> None:
        self.calls.append("running")


def gate() -> tuple[RunGate, Machine, Follow]:
    machine, follow = Machine(), Follow()
    return RunGate(cast(Any, machine), cast(Any, follow)), machine, follow


def test_the_vm_runs_again_only_when_its_last_holder_lets_go() -> None:
    async def go() -> None:
        g, machine, follow = gate()
        await g.hold("checkpoint")
        await g.hold("lease")
        assert machine.calls == ["pause"] and follow.calls == ["left"]
        assert await g.release("checkpoint") is False
        assert machine.calls == ["pause"]
        assert await g.release("lease") is True
        assert machine.calls == ["pause", "resume"] and follow.calls == ["left", "running"]

    asyncio.run(go())


def test_a_pause_cancelled_midway_is_undone_by_its_release() -> None:
    async def go() -> None:
        g, machine, _ = gate()
        machine.slow.set()
        holding = asyncio.ensure_future(g.hold("checkpoint"))
        await asyncio.sleep(0.01)
        assert machine.calls == ["pause"]  # QEMU may be paused already
        holding.cancel()
        await asyncio.gather(holding, return_exceptions=True)
        assert g.holds == {"checkpoint"}  # recorded, not lost with the cancel
        assert await g.release("checkpoint") is True
        assert machine.calls == ["pause", "resume"]

    asyncio.run(go())


def test_a_migration_that_paused_the_vm_keeps_its_address_closed_after_a_lease_lapse() -> None:
    async def go() -> None:
        g, machine, follow = gate()
        g.paused("migration")
        await g.hold("lease")  # paused already: no second pause
        assert machine.calls == [] and follow.calls == ["left"]
        assert await g.release("lease") is False  # the migration still holds it
        assert follow.calls == ["left"]
        assert await g.release("migration") is True
        assert machine.calls == ["resume"]

    asyncio.run(go())
