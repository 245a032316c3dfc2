"""VMSession without QEMU: the devices served through a real FUSE mount, the page
cache stores a migration's destination makes, and a clean close."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from drafter.device import Device
from drafter.package import PackageConfig
from drafter.session import VMSession

CHUNK = 64 * 1024
SIZE = 4 * CHUNK


def _session(tmp_path: Path) -> VMSession:
    session = VMSession(tmp_path / "work")
    session.work.mkdir()
    for name in ("memory", "disk", "kernel", "initramfs"):
        session.devices[name] = Device(
            name, SIZE, None, session.work / f"{name}.overlay", chunk_size=CHUNK
        )
    session.devices["memory"].write(CHUNK, b"device bytes")
    config = PackageConfig(memory_mib=1, cpus=1, boot_args="", mac="02:00:00:00:00:01")
    machine = session.mount(config, None, "tcg")
    assert machine.config.memory == session.mountpoint / "memory"
    return session


def test_a_session_serves_its_devices_and_leaves_nothing_behind(tmp_path: Path) -> None:
    session = _session(tmp_path)
    try:
        with open(session.mountpoint / "memory", "rb") as f:
            f.seek(CHUNK)
            assert f.read(12) == b"device bytes"
        session.start_recording()
        with open(session.mountpoint / "disk", "rb") as f:
            f.read(10)
        assert session.recorded()["disk"] == [0]
        assert session.stop_recording() == {"memory": [], "disk": [0]}
    finally:
        session.close()
    assert not session.work.exists()
    with open("/proc/mounts") as f:
        assert str(session.mountpoint) not in f.read()
    session.close()  # a second close does nothing


def test_stored_pages_are_what_a_mapping_sees_without_a_fuse_read(tmp_path: Path) -> None:
    """What a destination does before its VM runs: the page cache takes a chunk and
    then only some pages of another, and QEMU's shared mapping sees exactly those."""
    session = _session(tmp_path)
    memory = session.devices["memory"]
    try:
        fd = os.open(session.mountpoint / "memory", os.O_RDWR)  # as QEMU holds it
        memory.recording = {}  # FUSE reads would show here
        stored = session.host.run_sync(session.host.store_cache(memory, [1]))
        assert stored == 1
        runs = {2: [(4096, b"P" * 4096)]}
        session.host.run_sync(session.host.store_cache_runs(memory, runs))
        try:
            view = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)
            assert view[CHUNK : CHUNK + 12] == b"device bytes"
            assert view[2 * CHUNK + 4096 : 2 * CHUNK + 4100] == b"PPPP"
            assert memory.stop_recording() == []  # both were page hits
            view.close()
        finally:
            os.close(fd)
    finally:
        session.close()
