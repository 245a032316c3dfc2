"""The Minecraft app (drafter-blueprint --app minecraft) as a player sees it: a real
flying-squid server in the guest, real mineflayer bots on the host (tests/support/
minecraft.py), through a snapshot and resume and along live migrations.

Each test prints its figures (``pytest -s``) for the record.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from drafter.blueprint.builder import Blueprint, BlueprintSpec, build
from support.common import CACHE, OUT, TEST_CIDR_BASE, TMP_PREFIX
from support.minecraft import Builder, player, row
from support.net import free_port
from support.vms import (
    console_on_failure,
    copy_package,
    ctrl_c,
    finish_source,
    migrate,
    packager,
    registry,
    runner,
    running,
    wait_resumed,
)

MEMORY_MIB = 512  # flying-squid is 110-190 MB resident
STABLE_NET = f"10.{TEST_CIDR_BASE}.201"  # apart from test_follow's stable addresses


@pytest.fixture(scope="session")
def minecraft_blueprint() -> Blueprint:
    began = time.monotonic()
    blueprint = build(BlueprintSpec(app="minecraft"), OUT / "test" / "blueprint-minecraft", CACHE)
    print(f"\nminecraft blueprint: {time.monotonic() - began:.1f}s (cached if short), disk "
          f"{blueprint.disk.stat().st_size >> 20} MiB")  # fmt: skip
    return blueprint


@pytest.fixture(scope="session")
def minecraft_package(minecraft_blueprint: Blueprint, network) -> Iterator[Path]:
    """A packaged Minecraft VM, made once by drafter-packager (it waits for port 25565)."""
    directory = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "minecraft-"))
    path = directory / "minecraft.drft"
    try:
        began = time.monotonic()
        result = packager(
            minecraft_blueprint, path, "--netns", network.name(3), "--memory-size",
            str(MEMORY_MIB),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        print(f"\nminecraft package: boot to a listening server and snapshot in "
              f"{time.monotonic() - began:.1f}s")  # fmt: skip
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_blocks_survive_ctrl_c_and_a_second_run(minecraft_package, network, workdir) -> None:
    package = copy_package(minecraft_package, workdir)
    address = network.info(1).external_address
    built = [row(i) for i in range(8)]
    with runner(package, network.name(1), "-v") as proc, console_on_failure(workdir):
        running(proc)
        began = time.monotonic()
        with player(address, "alice") as alice:
            login_s = time.monotonic() - began
            for at in built:
                alice.place(at)
            alice.dig(built[-1])
            assert alice.chat("hello before the snapshot")["text"] == "hello before the snapshot"
            # flying-squid does not echo a creative player's own dig: others see it.
        ctrl_c(proc)
    with runner(package, network.name(1), "-v") as proc:
        running(proc)
        with player(address, "bob") as bob:
            assert bob.blocks(built) == ["stone"] * 7 + ["air"]
            assert bob.chat("hello after the resume")["text"] == "hello after the resume"
            bob.place(row(8))
        ctrl_c(proc)
    with runner(package, network.name(1), "-v") as proc:
        running(proc)
        with player(address, "carol") as carol:
            assert carol.blocks([*built, row(8)]) == ["stone"] * 7 + ["air", "stone"]
        ctrl_c(proc)
    print(f"\nminecraft run/Ctrl-C/run: first login {login_s:.1f}s after the resume, "
          f"7 blocks and a dug one seen by a second and a third player")  # fmt: skip


@dataclass
class Hop:
    summary: str  # the destination's "migrated from ..." line
    silence_ms: int  # the longest time the server sent the player nothing, around the hop
    wait_s: float  # the longest time between two confirmed blocks, around the hop
    checked: int  # blocks placed before the hop, all found after it


@dataclass
class Chain:
    login_s: float  # the lazy start (registry → peer) to the player's spawn
    hops: list[Hop] = field(default_factory=list)
    placed: int = 0
    failures: list[str] = field(default_factory=list)

    def report(self) -> str:
        silences = sorted(h.silence_ms for h in self.hops)
        return (
            f"lazy start to spawn {self.login_s:.1f}s; {len(self.hops)} hops, 0 disconnects, "
            f"{self.placed} blocks placed, all present; longest pause per hop "
            f"{[h.silence_ms for h in self.hops]} ms (median {statistics.median(silences):.0f}),"
            f" longest wait between confirmed blocks {[round(h.wait_s, 1) for h in self.hops]}"
            f" s; failed placements {len(self.failures)}\n  "
            + "\n  ".join(h.summary for h in self.hops)
        )


def stable_flags(network, address: str) -> list[str]:
    return ["--state-dir", str(network.state_dir), "--stable-address", address]


def play_along_a_chain(package: Path, network, workdir: Path, address: str, *extra: str) -> Chain:
    """registry → peer in ns0 (lazy start) → ns1 → ns2 → ns0 at ``address`` while a
    player builds; after each hop a new player reads every block placed before it."""
    hops = [0, 1, 2, 0]
    flags = stable_flags(network, address)
    with registry(package) as (_, raddr), contextlib.ExitStack() as stack:
        ports = [free_port() for _ in hops]
        began = time.monotonic()
        source = stack.enter_context(
            migrate(raddr, network.name(0), workdir, f"127.0.0.1:{ports[0]}", *flags)
        )
        wait_resumed(source)
        bot = stack.enter_context(player(address, "builder"))
        chain = Chain(login_s=time.monotonic() - began)
        builder = Builder(bot)
        builder.start()
        stack.callback(builder.finish)
        time.sleep(3)
        for hop in range(1, len(hops)):
            placed = builder.placed_before(time.monotonic())
            bot.longest_silence_ms()  # from here
            builder.longest_wait_s = 0.0
            dest = stack.enter_context(
                migrate(
                    f"127.0.0.1:{ports[hop - 1]}",
                    network.name(hops[hop]),
                    workdir,
                    f"127.0.0.1:{ports[hop]}",
                    *flags,
                    *extra,
                )  # fmt: skip
            )
            wait_resumed(dest)
            finish_source(source)
            assert dest.stdout is not None
            summary = next(ln.strip() for ln in dest.stdout if ln.startswith("migrated from"))
            print(f"\nhop {hop} at {time.time():.1f}: {summary}; the player: {bot.ended()}")
            source = dest
            count = len(builder.placed)
            deadline = time.monotonic() + 60
            while len(builder.placed) < count + 5:  # the player builds on at the new host
                assert bot.ended() == [], bot.ended()
                assert time.monotonic() < deadline, builder.failures
                time.sleep(0.2)
            silence = bot.longest_silence_ms()  # the hop's, before a reader adds load
            with player(address, f"reader{hop}") as reader:
                names = reader.blocks(placed)
            missing = [at for at, name in zip(placed, names, strict=True) if name != "stone"]
            assert missing == [], f"hop {hop}: blocks placed before it are gone: {missing}"
            assert bot.ended() == [], bot.ended()
            chain.hops.append(Hop(summary, silence, builder.longest_wait_s, len(placed)))
        builder.finish()
        assert bot.ended() == [], bot.ended()
        chain.placed = len(builder.placed)
        chain.failures = builder.failures
        source.send_signal(signal.SIGINT)
        source.communicate(timeout=60)
        assert source.returncode == 0
    return chain


def test_a_player_builds_on_through_three_migrations(minecraft_package, network, workdir) -> None:
    chain = play_along_a_chain(minecraft_package, network, workdir, f"{STABLE_NET}.1")
    print("\nminecraft chain (default pre-copy): " + chain.report())
    assert len(chain.hops) == 3
    assert all("downtime" in h.summary for h in chain.hops)


def test_a_player_builds_on_with_resume_threshold_zero(minecraft_package, network, workdir) -> None:
    chain = play_along_a_chain(
        minecraft_package, network, workdir, f"{STABLE_NET}.2", "--resume-threshold", "0"
    )
    print("\nminecraft chain (--resume-threshold 0): " + chain.report())
    assert len(chain.hops) == 3
