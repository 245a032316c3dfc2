"""Named network namespaces (the ``ip netns`` kind, under /run/netns) and work inside them."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from drafter.errors import DrafterError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")


def namespace_exists(name: str) -> bool:
    """Whether a named network namespace ``name`` exists."""
    return (NETNS_DIR / name).exists()


def list_namespaces() -> list[str]:
    """Names of all named network namespaces."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def create_namespace(name: str) -> None:
    """Create the named network namespace ``name`` (error if it exists)."""
    if namespace_exists(name):
        raise DrafterError(f"network namespace {name!r} already exists")
    log.debug("creating network namespace %s", name)
    from pyroute2 import netns as pr_netns  # here: pyroute2 takes 70 ms to import

    try:
        pr_netns.create(name)
    except OSError as e:
        raise DrafterError(f"could not create network namespace {name!r}: {e}") from None


def remove_namespace(name: str) -> bool:
    """Remove the named network namespace ``name``; False if it did not exist."""
    if not namespace_exists(name):
        return False
    log.debug("removing network namespace %s", name)
    from pyroute2 import netns as pr_netns

    pr_netns.remove(name)
    return True


@contextmanager
def in_namespace(name: str) -> Iterator[None]:
    """Run the calling thread inside namespace ``name`` for the ``with`` body.

    setns(2) moves only the calling thread; sockets created in the body stay in
    ``name`` after the thread moves back.
    """
    from pyroute2 import netns as pr_netns

    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        pr_netns.setns(name, flags=0)
        try:
            yield
        finally:
            pr_netns.setns(saved, flags=0)
    finally:
        os.close(saved)


def write_sysctl(name: str, key: str, value: str) -> None:
    """Set sysctl ``key`` (dotted, e.g. ``net.ipv4.ip_forward``) inside namespace ``name``."""
    path = Path("/proc/sys") / key.replace(".", "/")
    with in_namespace(name):
        # /proc/sys/net shows the namespace of the thread that opens it.
        path.write_text(value)
    log.debug("%s: %s = %s", name, key, value)


def run_in_namespace(
    name: str, argv: list[str], *, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``name`` (``ip netns exec``); raise DrafterError on failure."""
    cmd = ["ip", "netns", "exec", name, *argv]
    proc = subprocess.run(cmd, input=input_text, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        detail = msg[-1] if msg else f"exit status {proc.returncode}"
        raise DrafterError(f"{argv[0]} in namespace {name!r} failed: {detail}")
    return proc
