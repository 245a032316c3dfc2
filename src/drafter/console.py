"""Attach the terminal to a VM's serial console (``--enable-input`` / ``--enable-output``).

With input enabled the terminal is put in raw mode, so Ctrl-C reaches the VM; stop
the command with a signal from elsewhere (``kill -INT <pid>``), as in the seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def attach(socket: Path, enable_input: bool, enable_output: bool) -> None:
    """Copy console output to stdout and stdin to the console until cancelled."""
    if not (enable_input or enable_output):
        return  # leave the console free (it takes one client at a time)
    reader, writer = await asyncio.open_unix_connection(str(socket))
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []

    async def pump_out() -> None:
        out = sys.stdout.buffer
        while data := await reader.read(4096):
            out.write(data.replace(b"\n", b"\r\n") if enable_input else data)
            out.flush()

    async def pump_in() -> None:
        q: asyncio.Queue[bytes] = asyncio.Queue()
        fd = sys.stdin.fileno()
        loop.add_reader(fd, lambda: q.put_nowait(os.read(fd, 1024)))
        try:
            while data := await q.get():
                writer.write(data)
                await writer.drain()
        finally:
            loop.remove_reader(fd)

    tasks.append(asyncio.create_task(pump_out()))
    if enable_input:
        tasks.append(asyncio.create_task(pump_in()))
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        writer.close()
