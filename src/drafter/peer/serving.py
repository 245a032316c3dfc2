"""Serving a running VM on for the next migration: its chunk server and migration
source (device loop), and what the source needs of the VM on the main loop (suspend
with rollback, resume here, the gate of this namespace's address)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from drafter import snapshot
from drafter.agent_client import AgentClient
from drafter.checkpoint.running import VMCheckpoints
from drafter.errors import DrafterError
from drafter.migration import MigrationSource, VMControl
from drafter.network.follow import Follower
from drafter.peer.options import PeerOptions
from drafter.session import VMSession
from drafter.transport import protocol as wire
from drafter.transport import security
from drafter.transport.server import ChunkServer
from drafter.vmm.qemu import QemuMachine

log = logging.getLogger(__name__)


class SessionControl:
    """The VM's side of a migration away from here (main loop): suspend, and if any
    step fails the VM runs here again; resume here. This namespace's address closes
    (its gate) at the pause and opens again if the VM runs here again."""

    def __init__(
        self, session: VMSession, follow: Follower, checkpoints: VMCheckpoints | None = None
    ) -> None:
        self.session = session
        self.follow = follow
        self.checkpoints = checkpoints  # held off while switching over
        self._gate_closing: asyncio.Future[None] | None = None

    def _close_gate(self) -> None:
        """Paused: resets at this namespace's address, and the host's connections
        there cut, beside the state save (off the switch-over's critical path)."""
        self._gate_closing = asyncio.ensure_future(asyncio.to_thread(self.follow.left))
        self._gate_closing.add_done_callback(_logged("closing the gate"))

    async def _reopen_gate(self) -> None:
        await self.settle()
        await asyncio.to_thread(self.follow.running)  # it runs here again

    async def settle(self) -> None:
        """Wait until a gate that is closing has closed."""
        if self._gate_closing is not None:
            await asyncio.wait([self._gate_closing])

    async def suspend(self) -> tuple[bytes, float, dict[str, float]]:
        """BeforeSuspend, pause, save, sync: the state, when it paused (wall clock) and
        each step's milliseconds."""
        session = self.session
        machine = session.machine
        assert machine is not None
        timings = snapshot.Timings()
        checkpoints = self.checkpoints
        if checkpoints is not None:  # a checkpoint under way ends first; no new one
            await checkpoints.hold()

        def paused() -> None:
            self._close_gate()
            if checkpoints is not None:
                checkpoints.migration_paused()

        try:
            await session.suspend(timings, presync=True, paused=paused)
            phases = {
                "BeforeSuspend": timings.before_suspend * 1000,  # and a memory sync
                "pause": timings.pause * 1000,
                "state save": timings.save * 1000,
                "memory sync": timings.sync * 1000,
            }
            return session.state.read_bytes(), timings.paused_at, phases
        except BaseException as e:
            # Whatever step failed, the VM runs here again, AfterResume included.
            if self.checkpoints is not None:
                self.checkpoints.unhold()
            try:
                if timings.paused_at and await self._run_again(machine):
                    await self._reopen_gate()
                async with AgentClient(machine.agent_socket) as agent:
                    await agent.after_resume()
            except Exception as again:
                log.error("could not resume the VM here after that: %s", again)
            else:
                log.warning("switch-over failed (%s): the VM runs here again "
                            "(resumed, AfterResume done)", e)  # fmt: skip
            raise

    async def _run_again(self, machine: QemuMachine) -> bool:
        """Let the VM paused for the migration run here again; whether it runs (with
        checkpoints, not while the lease is lapsed or lost)."""
        if self.checkpoints is not None:
            return await self.checkpoints.migration_released()
        await machine.resume()
        return True

    async def resume_here(self) -> None:
        machine = self.session.machine
        assert machine is not None
        if self.checkpoints is not None:  # the lease back first, if it was handed over
            await self.checkpoints.take_back()
        if not await self._run_again(machine):
            raise DrafterError("the VM's lease is not held here: the VM stays paused")
        await self._reopen_gate()
        if self.checkpoints is not None:
            self.checkpoints.unhold()
        async with AgentClient(machine.agent_socket) as agent:
            await agent.after_resume()


class Serving:
    """The VM served on ``options.laddr`` so another peer can migrate it away: a
    :class:`MigrationSource` over the session's devices behind a :class:`ChunkServer`
    (both on the device loop). If the address is still the source's this VM came
    from (the seed's chain on one host), it is taken over once that one has left."""

    def __init__(
        self,
        options: PeerOptions,
        session: VMSession,
        config: bytes,
        follow: Follower,
        hot: Callable[[], dict[str, list[int]]],
        migrated_away: Callable[[], None],
        checkpoints: VMCheckpoints | None = None,
    ) -> None:
        self.options = options
        self.session = session
        self.vm = SessionControl(session, follow, checkpoints)
        control = VMControl(
            asyncio.get_running_loop(), self.vm.suspend, self.vm.resume_here, migrated_away,
            checkpoints.hand_over if checkpoints is not None else None,
        )  # fmt: skip
        self.source = MigrationSource(
            session.devices,
            config,
            session.mountpoint / "memory",
            control,
            grace=options.grace,
            offer_timeout=options.offer_timeout,
            precopy_timeout=options.precopy_timeout,
        )
        # Asked at each connection: a migration may start before the recording ends.
        self.source.hot_chunks = hot
        self._server = ChunkServer(self.source, control=self.source)
        self.server: ChunkServer | None = None  # once it listens
        self._takeover: asyncio.Future[None] | None = None
        if options.metrics is not None:
            options.metrics.attach_source(self.source)
            options.metrics.attach_server(self._server)

    async def start(self, may_wait: bool) -> None:
        """Listen (main loop). ``may_wait``: the VM migrated here, so an address in use
        may be its source's, to be taken over once it has left."""
        o = self.options
        host, port = wire.parse_addr(o.laddr, "--laddr")
        ssl = security.tls_server_options(o.tls_cert, o.tls_key)
        start = functools.partial(self._server.start, host or None, port, ssl=ssl,
                                  token=o.token, local_token=o.local_token)  # fmt: skip
        try:
            await self.session.host.run(start())
        except OSError as e:
            if e.errno != errno.EADDRINUSE or not may_wait:
                raise DrafterError(f"cannot serve on {o.laddr}: {e.strerror or e}") from None
            log.info("%s is still the source's; serving there once it has left", o.laddr)
            self._takeover = asyncio.ensure_future(self._serve_when_free(start))
            return
        self._listening()

    def _listening(self) -> None:
        self.server = self._server
        log.info("serving this VM for migration on %s", ", ".join(self._server.addresses))

    async def _serve_when_free(self, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
        deadline = time.monotonic() + max(60.0, (self.options.grace or 0.0) * 2)
        while True:
            await asyncio.sleep(0.2)
            try:
                await self.session.host.run(start())
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    log.error("cannot serve on %s: %s", self.options.laddr, e.strerror or e)
                    return
                continue
            self._listening()
            return

    async def take_back(self) -> str:
        """The operator's call (SIGUSR1): resume the VM here while the destination of
        a switched-over migration is away. Says what was done and what it cost."""
        return await self.session.host.run(self.source.take_back())

    def stop_takeover(self) -> None:
        """No more waiting for the address to be free (the VM is going away)."""
        if self._takeover is not None:
            self._takeover.cancel()

    async def close(self) -> None:
        """Stop serving (main loop; after the VM stopped)."""
        self.stop_takeover()
        await self.vm.settle()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.session.host.run(self.server.close()), 5)
            self.server = None


def _logged(what: str) -> Callable[[asyncio.Future[None]], None]:
    def report(future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.warning("%s failed: %s", what, future.exception())

    return report
