"""Helpers the bench scripts share: our commands, free ports, waiting for Redis."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

BIN = Path(sys.executable).parent  # the venv's bin: drafter-* commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_reply(address: str, timeout: float = 120) -> None:
    """Wait until Redis at ``address`` answers PING (polling every 2 ms).

    redis-py retries a failed connect itself, 10 times with a backoff of up to 1 s
    (``ExponentialWithJitterBackoff``, redis-py 8): that would make the poll up to a
    second late. It does not retry here; the loop does, every 2 ms. A SYN the VM
    drops before it runs is not waited for either: a new one goes 0.1 s later."""
    client = redis.Redis(host=address, socket_timeout=5, socket_connect_timeout=0.1,
                         retry=Retry(NoBackoff(), 0))  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def make_package(
    blueprint: Path,
    netns: str,
    memory_mib: int,
    output: Path,
    bin_dir: Path = BIN,
    timeout: float | None = None,
) -> None:
    """drafter-packager: the blueprint in ``blueprint`` (a directory) as a package."""
    subprocess.run(
        [bin_dir / "drafter-packager", "--netns", netns, "--memory-size", str(memory_mib),
         "--kernel-path", str(blueprint / "drafter.drftkernel"),
         "--initramfs-path", str(blueprint / "drafter.drftinitramfs"),
         "--disk-path", str(blueprint / "drafter.drftdisk"),
         "--package-output-path", str(output)],
        check=True, capture_output=True, timeout=timeout,
    )  # fmt: skip


def emit(results: dict[str, Any], output: Path | None) -> None:
    """A bench's results as JSON on stdout, and in ``output`` too when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
