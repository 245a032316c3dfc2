"""The one bridge between a command's two event loops (docs/architecture.md): the main
loop (QEMU's QMP, the guest agent, signals) and the device loop (FUSE, devices, the
wire, the migration protocol), each on its own thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def submit(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]
) -> concurrent.futures.Future[T]:
    """Start ``coro`` on ``loop`` (from any thread); its outcome as a thread-safe future."""
    return asyncio.run_coroutine_threadsafe(coro, loop)


async def run_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on ``loop`` and await it from the loop running this call."""
    if loop is asyncio.get_running_loop():
        return await coro
    return await asyncio.wrap_future(submit(loop, coro))


def call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    """Run the plain callable ``callback`` on ``loop`` soon (from any thread): an event
    one loop tells the other, with nothing to wait for."""
    if loop is _running():
        loop.call_soon(callback)
    else:
        loop.call_soon_threadsafe(callback)


def _running() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
