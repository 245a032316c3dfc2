"""A runner's flush that fails (src/drafter/cmd/runner.py): the suspended VM is kept
and written when asked again, or given up with a line that says what was lost. The
VM is a stand-in whose write fails while its "disk" is full."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest

from drafter.cmd.runner import write_back_when_asked
from drafter.errors import DrafterError
from drafter.vm import FlushFailed

TARGET = Path("/nowhere/out.drft")


class VM:
    package_path = Path("/nowhere/in.drft")

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.writes = 0

    async def write_back(self) -> None:
        self.writes += 1
        if self.writes <= self.failures:
            raise FlushFailed(TARGET, "No space left on device", 5 << 20)


def test_a_failed_flush_is_written_when_asked_again(capsys) -> None:
    async def go() -> None:
        vm = VM(failures=1)
        again, give_up = asyncio.Event(), asyncio.Event()
        waiting = asyncio.ensure_future(
            write_back_when_asked(cast(Any, vm), FlushFailed(TARGET, "full", 5 << 20), again,
                                  give_up)
        )  # fmt: skip
        await asyncio.sleep(0.05)
        assert not waiting.done() and vm.writes == 0  # it waits for the user
        again.set()
        await asyncio.sleep(0.05)
        assert not waiting.done() and vm.writes == 1  # still full: it waits again
        again.set()
        await asyncio.wait_for(waiting, 5)
        assert vm.writes == 2

    asyncio.run(go())
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 2 and all("Nothing is lost yet" in line for line in said)
    assert "5 MiB" in said[0] and "Ctrl-C" in said[0]


def test_a_flush_given_up_says_what_is_lost() -> None:
    async def go() -> None:
        vm = VM(failures=99)
        again, give_up = asyncio.Event(), asyncio.Event()
        waiting = asyncio.ensure_future(
            write_back_when_asked(cast(Any, vm), FlushFailed(TARGET, "full", 5 << 20), again,
                                  give_up)
        )  # fmt: skip
        await asyncio.sleep(0.05)
        give_up.set()
        with pytest.raises(DrafterError, match="5 MiB of changes since its resume are lost"):
            await asyncio.wait_for(waiting, 5)
        assert vm.writes == 0

    asyncio.run(go())
