"""Crash safety: SIGKILL the runner at random moments; the package always resumes,
holding either the snapshot from before the run or the new one, never a mix."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

from support.common import children, command, stop_process, wait_gone, wait_killed
from support.vms import copy_package, wait_for_redis


def test_sigkill_at_random_moments_never_breaks_the_package(
    redis_package, network, workdir
) -> None:
    rng = random.Random(20261126)
    package = copy_package(redis_package, workdir)
    netns = network.name(0)
    address = network.info(0).external_address
    possible = {None}  # generations the package may hold now (None: never written)
    kills = {"run": 0, "flush": 0, "after flush": 0}
    for attempt in range(1, 21):
        proc = subprocess.Popen(
            [command("drafter-runner"), "--netns", netns, "--package-path", str(package)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            client = wait_for_redis(address)
            raw = client.get("generation")
            generation = int(raw) if raw is not None else None
            assert generation in possible, (attempt, generation, possible)
            assert client.set("generation", attempt)
            # Redis' own counters must match the generation: no half-old state.
            assert client.incr("resumes") == (generation or 0) + 1
            client.set("resumes", attempt)
            qemu = children(proc.pid)
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0, 0.5))
                proc.kill()  # during the run: the package keeps the old snapshot
                kills["run"] += 1
                possible = {generation}
            else:
                proc.send_signal(signal.SIGINT)
                time.sleep(rng.uniform(0, 1.2))  # a flush takes about 0.5-1 s here
                finished = proc.poll() is not None
                proc.kill()
                kills["after flush" if finished else "flush"] += 1
                possible = {attempt} if finished and proc.returncode == 0 else {generation, attempt}
            wait_killed(proc)
            wait_gone(qemu)
        finally:
            stop_process(proc, signal.SIGKILL)
    assert kills["flush"] >= 5, kills
    # The last package still resumes and holds one of the expected snapshots.
    proc = subprocess.Popen(
        [command("drafter-runner"), "--netns", netns, "--package-path", str(package)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        raw = wait_for_redis(address).get("generation")
        assert (int(raw) if raw is not None else None) in possible
    finally:
        assert stop_process(proc) == 0
    leftovers = [p.name for p in workdir.iterdir() if p.name != package.name]
    assert leftovers == [], leftovers
    mounts = Path("/proc/mounts").read_text()
    assert str(workdir) not in mounts
