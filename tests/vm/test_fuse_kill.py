"""A process killed while its own FUSE mount is busy must still exit.

Peers and runners serve their devices through FUSE from a thread of their own and
sync the memory file they serve. If that sync ran on a thread of the same process, a
SIGKILL during it would leave the process unkillable (in D state) forever: the
syncing thread waits for an answer only the dead FUSE thread could give.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# Like QEMU, another process maps the memory file shared and dirties a page; the
# process that serves the mount then syncs the file while its writes never get an answer.
MAPPER = textwrap.dedent(
    """
    import mmap, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    view = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED)
    view[0:5] = b"dirty"
    print("mapped", flush=True)
    time.sleep(3600)
    """
)
SCRIPT = textwrap.dedent(
    """
    import asyncio, subprocess, sys
    from pathlib import Path
    from drafter.device import Device
    from drafter.devicefs import DeviceFS, DeviceHost
    from drafter.snapshot import fsync_file

    async def stall(self, fh, off, buf):
        await asyncio.sleep(3600)  # the write never gets its answer

    DeviceFS.write = stall
    work = Path(sys.argv[1])
    device = Device("memory", 1 << 20, None, work / "memory.cache")
    host = DeviceHost()
    host.mount([device], work / "devices")
    memory = work / "devices" / "memory"
    mapper = subprocess.Popen([sys.executable, "-c", sys.argv[2], str(memory)],
                              stdout=subprocess.PIPE, text=True)
    assert mapper.stdout.readline().strip() == "mapped"
    print("syncing", mapper.pid, flush=True)
    fsync_file(memory)
    print("synced", flush=True)
    """
)


def fuse_connection(mountpoint: Path) -> str | None:
    """The fusectl name of the mount at ``mountpoint`` (its device number)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            major, minor = fields[2].split(":")
            return str(os.makedev(int(major), int(minor)))
    return None


def abort_fuse_connection(mountpoint: Path) -> None:
    connections = Path("/sys/fs/fuse/connections")
    if not any(connections.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connections)], check=False)
    name = fuse_connection(mountpoint)
    if name is not None and (connections / name).exists():
        (connections / name / "abort").write_text("1")


def test_a_process_killed_during_a_sync_of_its_own_mount_exits(workdir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(workdir), MAPPER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    mountpoint = workdir / "devices"
    mapper = 0
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["syncing"], (line, proc.stderr.read() if proc.poll() else "")
        mapper = int(line[1])
        time.sleep(1.0)  # the sync is now waiting on the stalled write
        assert proc.poll() is None, "the sync finished although the write never did"
        os.kill(proc.pid, signal.SIGKILL)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError("the killed process is stuck on its own FUSE mount") from None
    finally:
        if proc.poll() is None:  # unstick it so that the suite goes on
            abort_fuse_connection(mountpoint)
            proc.kill()
            proc.wait(10)
        if mapper:
            with contextlib.suppress(ProcessLookupError):
                os.kill(mapper, signal.SIGKILL)
