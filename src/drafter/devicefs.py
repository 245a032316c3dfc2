"""Devices exposed as files through FUSE, so the VMM opens them like any file.

QEMU maps ``memory`` shared and reads ``disk`` through virtio-blk; every read and
write lands in :class:`drafter.device.Device`. The FUSE server (pyfuse3 in asyncio
mode) runs on a thread of its own with its own event loop: any code of this process
may then touch the mounted files (fsync the memory file, stat it) without waiting on
itself. pyfuse3 allows one mount per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import subprocess
import threading
from pathlib import Path

import pyfuse3
import pyfuse3.asyncio

from drafter.device import Device
from drafter.errors import DrafterError

log = logging.getLogger(__name__)

pyfuse3.asyncio.enable()


class DeviceFS(pyfuse3.Operations):
    """A flat directory with one file per device."""

    enable_writeback_cache = False

    def __init__(self, devices: list[Device]) -> None:
        super().__init__()
        self.by_inode = {pyfuse3.ROOT_INODE + 1 + i: d for i, d in enumerate(devices)}
        self.by_name = {d.name.encode(): ino for ino, d in self.by_inode.items()}

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = 300
        attr.attr_timeout = 300
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o700
            attr.st_nlink = 2
            return attr
        device = self.by_inode.get(inode)
        if device is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_mode = stat.S_IFREG | (0o600 if device.writable else 0o400)
        attr.st_nlink = 1
        attr.st_size = device.size
        attr.st_blksize = 4096
        attr.st_blocks = (device.size + 511) // 512
        return attr

    async def getattr(self, inode, ctx=None):  # type: ignore[no-untyped-def]
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):  # type: ignore[no-untyped-def]
        inode = self.by_name.get(name) if parent_inode == pyfuse3.ROOT_INODE else None
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
        for inode, device in sorted(self.by_inode.items()):
            if inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, device.name.encode(), self._attr(inode), inode):
                return

    async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
        device = self.by_inode.get(inode)
        if device is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & (os.O_WRONLY | os.O_RDWR) and not device.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):  # type: ignore[no-untyped-def]
        try:
            return self.by_inode[fh].read(off, size)
        except OSError as e:
            log.error("read of %s failed: %s", self.by_inode[fh].name, e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
        device = self.by_inode[fh]
        try:
            return device.write(off, buf)
        except PermissionError:
            raise pyfuse3.FUSEError(errno.EROFS) from None
        except ValueError:
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except OSError as e:
            log.error("write to %s failed: %s", device.name, e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
        device = self.by_inode.get(inode)
        if fields.update_size and (device is None or attr.st_size != device.size):
            raise pyfuse3.FUSEError(errno.EPERM)  # devices have a fixed size
        return self._attr(inode)

    async def fsync(self, fh, datasync):  # type: ignore[no-untyped-def]
        return None  # writes are in the overlay already; a new package is synced whole

    async def flush(self, fh):  # type: ignore[no-untyped-def]
        return None

    async def release(self, fh):  # type: ignore[no-untyped-def]
        return None

    async def releasedir(self, fh):  # type: ignore[no-untyped-def]
        return None

    async def statfs(self, ctx):  # type: ignore[no-untyped-def]
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s


class Mount:
    """Serve ``devices`` as files under ``mountpoint`` until :meth:`close`."""

    def __init__(self, devices: list[Device], mountpoint: Path) -> None:
        self.devices = {d.name: d for d in devices}
        self.mountpoint = Path(mountpoint)
        self._fs = DeviceFS(devices)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def open(self) -> Mount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._serve, name="drafter-fuse", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise DrafterError(f"cannot mount devices at {self.mountpoint}: {self._error}")
        log.debug("devices mounted at %s", self.mountpoint)
        return self

    def _serve(self) -> None:
        options = set(pyfuse3.default_options) | {"fsname=drafter"}
        options.discard("default_permissions")
        try:
            pyfuse3.init(self._fs, str(self.mountpoint), options)
        except Exception as e:  # reported to open()
            self._error = e
            self._ready.set()
            return
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._ready.set()
        try:
            loop.run_until_complete(pyfuse3.main())
        except Exception:
            log.exception("FUSE server failed")
        finally:
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
            loop.close()

    def close(self) -> None:
        """Stop serving and unmount; safe to call more than once."""
        if self._thread is None:
            return
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(pyfuse3.terminate)
        self._thread.join(30)
        if self._thread.is_alive():
            lazy_unmount(self.mountpoint)
            self._thread.join(10)
        self._thread = None
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()

    def __enter__(self) -> Mount:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def lazy_unmount(mountpoint: Path) -> None:
    """Detach a (possibly dead) FUSE mount; used for leftovers of killed processes."""
    subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def unmount_stale_under(directory: Path) -> None:
    """Unmount every mount below ``directory`` (a dead process's work directory)."""
    prefix = str(directory.resolve()) + "/"
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted(points, key=len, reverse=True):
        if point.startswith(prefix):
            lazy_unmount(Path(point))
