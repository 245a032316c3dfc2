"""A real Minecraft player for the tests: a mineflayer bot (minecraft_bot/bot.js, run by
the host's node; scripts/install-deps installs mineflayer into .node/minecraft-bot).

``Bot`` drives one player through JSON lines; ``Builder`` keeps one placing blocks (and
chatting) in a thread, recording what the server confirmed and the longest wait.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from support.common import ROOT

BOT_SCRIPT = ROOT / "tests" / "support" / "minecraft_bot" / "bot.js"
BOT_MODULES = ROOT / ".node" / "minecraft-bot" / "node_modules"
PORT = 25565
GROUND = 4  # the superflat world's top block (grass) is at y 4
Position = tuple[int, int, int]


class BotError(AssertionError):
    """The bot reported an error, left, or did not answer in time."""


def row(i: int) -> Position:
    """The ``i``-th block a builder places: rows of 40 on the ground, away from spawn."""
    return (-20 + i % 40, GROUND + 1, 8 + i // 40)


class Bot:
    """One mineflayer player connected to ``host``; every event it printed in ``events``."""

    def __init__(self, host: str, name: str, port: int = PORT) -> None:
        if shutil.which("node") is None or not BOT_MODULES.is_dir():
            raise RuntimeError("the Minecraft bot is not installed (run scripts/install-deps)")
        self.name = name
        self.events: list[dict] = []
        self._inbox: queue.Queue[dict] = queue.Queue()
        self._lock = threading.Lock()  # one command and its answer at a time
        self.proc = subprocess.Popen(
            ["node", str(BOT_SCRIPT), host, str(port), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, NODE_PATH=str(BOT_MODULES)),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                self.events.append(event)
                self._inbox.put(event)
        self._inbox.put({"event": "exit"})

    def ended(self) -> list[dict]:
        """The events that mean the player lost the server (kicked, end, exit)."""
        return [e for e in self.events if e["event"] in ("kicked", "end", "exit")]

    def wait(self, name: str, timeout: float = 30) -> dict:
        """The next event called ``name``; BotError if the bot errs or leaves first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BotError(f"{self.name}: no {name!r} within {timeout:.0f}s") from None
            if event["event"] == name:
                return event
            if event["event"] in ("error", "kicked", "end", "exit"):
                raise BotError(f"{self.name} while waiting for {name!r}: {event}")

    def request(self, command: dict, answer: str, timeout: float = 30) -> dict:
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
            return self.wait(answer, timeout)

    def place(self, at: Position, timeout: float = 30) -> dict:
        """Place a stone block at ``at``, confirmed by the server: the ``placed`` event."""
        x, y, z = at
        return self.request({"cmd": "place", "x": x, "y": y, "z": z}, "placed", timeout)

    def dig(self, at: Position) -> dict:
        x, y, z = at
        return self.request({"cmd": "dig", "x": x, "y": y, "z": z}, "dug")

    def chat(self, text: str, timeout: float = 30) -> dict:
        """Say ``text``; the echo the server sent back."""
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "chat", "text": text}) + "\n")
            self.proc.stdin.flush()
            while True:
                echo = self.wait("chat", timeout)
                if echo["text"] == text:
                    return echo

    def blocks(self, positions: list[Position]) -> list[str | None]:
        """The names of the blocks at ``positions`` as this player sees them."""
        return self.request({"cmd": "blocks", "positions": positions}, "blocks", 60)["names"]

    def longest_silence_ms(self) -> int:
        """The longest time the server sent nothing, since the last call."""
        return int(self.request({"cmd": "gaps"}, "gaps")["longest_ms"])

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def player(host: str, name: str, timeout: float = 120, port: int = PORT) -> Iterator[Bot]:
    """A bot that has spawned on the server at ``host`` (retried until the server
    accepts players); it quits at the end."""
    deadline = time.monotonic() + timeout
    while True:
        bot = Bot(host, name, port)
        try:
            bot.wait("spawn", timeout=max(1.0, deadline - time.monotonic()))
            break
        except BotError:
            bot.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        yield bot
    finally:
        bot.close()


@dataclass(eq=False)  # a thread: hashed by identity
class Builder(threading.Thread):
    """Keeps ``bot`` placing blocks (``row(0)``, ``row(1)``, ...) and chatting every
    ``chat_every`` blocks, until ``stop`` is set. A block counts once the server
    confirmed it; a wait longer than the bot's placing timeout counts as a failure."""

    bot: Bot
    interval: float = 0.2
    chat_every: int = 10
    placed: list[tuple[float, Position]] = field(default_factory=list)  # (when, where)
    failures: list[str] = field(default_factory=list)
    longest_wait_s: float = 0.0  # the longest time between two confirmations
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, daemon=True)

    def run(self) -> None:
        last = time.monotonic()
        i = 0
        while not self.stop.is_set() and not self.bot.ended():
            try:
                self.bot.place(row(i), timeout=60)
                if i % self.chat_every == 0:
                    self.bot.chat(f"block {i}", timeout=60)
            except BotError as e:
                self.failures.append(str(e))
                if self.bot.ended():
                    return
            else:
                now = time.monotonic()
                self.longest_wait_s = max(self.longest_wait_s, now - last)
                last = now
                self.placed.append((now, row(i)))
            i += 1
            time.sleep(self.interval)

    def placed_before(self, moment: float) -> list[Position]:
        return [at for when, at in list(self.placed) if when <= moment]

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=120)
