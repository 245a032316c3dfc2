"""The seed's own Minecraft server for a user who has Mojang's server.jar
(docs/blueprint.md, "Mojang's server.jar"): the recipe as the docs give it, with a
stand-in jar (tests/support/standin_jar.py), since the real one cannot be downloaded
here. Blueprint → packager → runner → Ctrl-C → runner: the Java server answers on
port 25565 each time, and its connection count goes on after the resume, so the JVM
survived the snapshot instead of booting again."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

from drafter.blueprint.builder import Blueprint
from support.common import CACHE, OUT, ROOT, run_command
from support.standin_jar import GREETING, write_jar
from support.vms import console_on_failure, ctrl_c, packager, runner, running

RECIPE = ROOT / "docs" / "recipes" / "minecraft-server-jar.sh"
PORT = 25565
MEMORY_MIB = 512  # the stand-in's heap is tiny; the docs give 2048 for a real server


def greeting(address: str, timeout: float = 120) -> int:
    """The stand-in's connection count, once port 25565 of ``address`` answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, PORT), timeout=10) as s:
                line = s.makefile().readline()
            match = re.fullmatch(re.escape(GREETING) + r"(\d+)\n", line)
            assert match, line
            return int(match[1])
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_the_docs_server_jar_recipe_survives_a_snapshot(network, workdir: Path) -> None:
    # The docs show the script verbatim.
    script = RECIPE.read_text()
    assert f"```shell\n{script}```" in (ROOT / "docs" / "blueprint.md").read_text()
    jar = write_jar(workdir / "server.jar")
    out = OUT / "test" / "blueprint-server-jar"
    began = time.monotonic()
    built = run_command(
        "drafter-blueprint", "--app", "none", "--extra-packages", "openjdk-17-jre-headless",
        "--add-file", f"{jar}:/opt/minecraft/server.jar",
        "--customize-script", str(RECIPE),
        "--ready-port", str(PORT), "--disk-size", "1536M",
        "--output-dir", str(out), "--cache-dir", str(CACHE),
        timeout=1800,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    print(f"\nserver.jar blueprint: {time.monotonic() - began:.1f}s (cached if short)")
    package = workdir / "minecraft-jar.drft"
    began = time.monotonic()
    made = packager(Blueprint.at(out), package, "--netns", network.name(3),
                    "--memory-size", str(MEMORY_MIB))  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    print(f"server.jar package: boot to a listening JVM and snapshot in "
          f"{time.monotonic() - began:.1f}s")  # fmt: skip
    address = network.info(1).external_address
    with runner(package, network.name(1)) as proc, console_on_failure(workdir):
        running(proc)
        first = greeting(address)
        assert greeting(address) == first + 1
        ctrl_c(proc)
    with runner(package, network.name(1)) as proc, console_on_failure(workdir):
        running(proc)
        # A JVM that booted again would count from 1 (or 2, after the liveness probe).
        assert greeting(address) == first + 2
        ctrl_c(proc)
