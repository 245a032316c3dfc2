"""A migration to this host, the destination's side as a peer runs it: pre-copy and
switch-over on the device loop, the hand-over the resume waits for, the switch-over's
summary, and telling the source it is done once every chunk is here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from drafter import snapshot
from drafter.device import Device
from drafter.devicefs import DeviceHost
from drafter.migration import MigrationDestination
from drafter.peer.options import PeerOptions
from drafter.peer.pull import PullPool
from drafter.peer.summary import MigrationSummary
from drafter.transport.client import RemoteSource

log = logging.getLogger(__name__)


class IncomingMigration:
    """One migration from the peer at ``remote`` to here. ``switch_over`` (device
    loop), then the resume awaits :meth:`granted`; after it, :meth:`tell_done`."""

    def __init__(
        self,
        options: PeerOptions,
        remote: RemoteSource,
        devices: dict[str, Device],
        host: DeviceHost,
        pool: PullPool,
        summary: MigrationSummary,
        taken_back: Callable[[], None],
    ) -> None:
        self.host = host
        self.devices = devices
        self.summary = summary
        self.destination = MigrationDestination(
            remote,
            devices,
            pool.pull_missing,
            host,
            rounds=options.precopy_rounds,
            precopy_bytes=options.precopy_bytes,
            retry_timeout=options.retry_timeout,
            handover_timeout=options.handover_timeout,
        )
        self.destination.on_taken_back = taken_back  # called on the device loop
        self.switched_at = 0.0  # monotonic: when the switch-over was asked
        self.paused_at = 0.0  # wall clock: when the VM paused at the source
        # Awaited after the grant, before the VM may run here (main loop): the VM's
        # checkpoint lease taken over. If it raises, the VM never runs here.
        self.before_run: Callable[[], Awaitable[None]] | None = None

    @property
    def cached(self) -> dict[str, dict[int, None]]:
        """What this host stored into the page cache before the VM ran here."""
        return self.destination.cached

    async def switch_over(self, state_file: Path) -> None:
        """Pre-copy rounds, then switch-over; the state lands in ``state_file``. The
        hand-over is asked at once, while QEMU loads the state (device loop)."""
        migration = self.destination
        offered = time.monotonic()
        await migration.precopy()
        self.summary.rounds = migration.rounds_done
        self.switched_at = time.monotonic()
        self.summary.precopy_s = self.switched_at - offered
        answer = await migration.switch_over()
        self.paused_at = answer.paused_at
        await asyncio.to_thread(state_file.write_bytes, answer.state)

    def granted(self) -> Callable[[], Coroutine[Any, Any, None]]:
        """What the resume awaits between the load and the run: the hand-over (then
        the VM is ours)."""

        async def granted() -> None:
            # Asked only once the state is loaded: after the grant the source refuses
            # an abort (the VM may have run here), so a load that fails must come first.
            await self.host.run(self.destination.hand_over())
            if self.before_run is not None:
                await self.before_run()
            self.destination.told_to_run = True
            for device in self.devices.values():
                device.first_demand_at = None

        return granted

    def summarise(self, timings: snapshot.Timings) -> None:
        """The switch-over's steps, both sides, into the summary."""
        resumed = time.monotonic()
        summary = self.summary
        summary.downtime_s = max(0.0, timings.resumed_at - self.paused_at)
        summary.switch_s = resumed - self.switched_at
        phases = summary.phases
        phases.update(self.destination.phases)
        phases["load"] = timings.load * 1000
        phases["hand-over granted after"] = timings.granted * 1000
        phases["resume"] = timings.cont * 1000
        phases["AfterResume"] = timings.after_resume * 1000
        resumed_at = resumed - timings.after_resume
        served = [d.first_demand_at for d in self.devices.values() if d.first_demand_at]
        if served:
            phases["first chunk served"] = max(0.0, min(served) - resumed_at) * 1000
        log.info("switch-over phases (ms): %s", summary.phase_line())

    async def tell_done(self, pulled: Callable[[], Awaitable[None]]) -> bool:
        """Once the VM runs here and every chunk is local (``pulled``), the source may
        stop: tell it; whether it could be told (main loop)."""
        try:
            await pulled()
        except Exception as e:
            log.error("the migration cannot finish: %s", e)
            return False
        return await self.host.run(self.destination.finish())

    async def abort(self) -> None:
        """The VM never ran here: the source resumes it at once (main loop)."""
        await self.host.run(self.destination.abort())
