"""The host side of the guest channels: liveness and the agent's suspend/resume calls."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from drafter.errors import DrafterError

log = logging.getLogger(__name__)


async def _open(path: Path, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await asyncio.open_unix_connection(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            if loop.time() > deadline:
                raise DrafterError(f"cannot connect to {path}") from None
            await asyncio.sleep(0.05)


async def wait_for_liveness(
    socket: Path,
    timeout: float = 300.0,
    watchdog: Callable[[], Awaitable[None]] | None = None,
) -> float:
    """Wait until the guest says its application is up; return the seconds waited.

    ``watchdog`` is awaited every second and should raise when the VM has died, so
    a broken boot fails fast instead of waiting out the timeout.
    """
    start = time.monotonic()
    reader, writer = await _open(socket, 10.0)
    try:
        while True:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                raise DrafterError(f"the guest did not signal liveness within {timeout:.0f}s")
            try:
                line = await asyncio.wait_for(reader.readline(), min(1.0, left))
            except TimeoutError:
                if watchdog is not None:
                    await watchdog()
                continue
            if not line:
                raise DrafterError("the liveness channel closed (did the VM stop?)")
            if line.strip() == b"ready":
                writer.write(b"ack\n")
                await writer.drain()
                return time.monotonic() - start
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class AgentClient:
    """Calls into the guest agent over its channel (one connection per client)."""

    def __init__(self, socket: Path, timeout: float = 60.0) -> None:
        self.socket = socket
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> AgentClient:
        self._reader, self._writer = await _open(self.socket, 10.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def call(self, name: str, **args: object) -> None:
        """Send one call and wait for its answer; DrafterError if the guest reports one."""
        if self._reader is None or self._writer is None:
            raise DrafterError("agent client is not connected")
        request_id = next(self._ids)
        request = {"id": request_id, "call": name, **args}
        self._writer.write((json.dumps(request) + "\n").encode())
        await self._writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise DrafterError(f"the guest agent did not answer {name} in {self.timeout:.0f}s")
            try:
                line = await asyncio.wait_for(self._reader.readline(), left)
            except TimeoutError:
                continue
            if not line:
                raise DrafterError(f"the agent channel closed during {name}")
            try:
                reply = json.loads(line)
            except ValueError:
                log.debug("agent sent non-JSON line %r", line)
                continue
            if reply.get("id") != request_id:
                continue  # an answer to an earlier, abandoned call
            if not reply.get("ok"):
                raise DrafterError(f"guest agent {name} failed: {reply.get('error')}")
            return

    async def before_suspend(self) -> None:
        await self.call("before_suspend")

    async def after_resume(self) -> None:
        await self.call("after_resume", time_ns=time.time_ns())
