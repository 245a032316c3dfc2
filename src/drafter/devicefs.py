"""Devices exposed as files through FUSE, so the VMM opens them like any file.

QEMU maps ``memory`` shared and reads ``disk`` through virtio-blk; every read and
write lands in :class:`drafter.device.Device`. The FUSE server (pyfuse3 in asyncio
mode) runs on a thread of its own with its own event loop: any code of this process
may then touch the mounted files (fsync the memory file, stat it) without waiting on
itself. pyfuse3 allows one mount per process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import stat
import subprocess
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import pyfuse3.asyncio

from drafter import loops
from drafter.chunks import Priority
from drafter.device import Device
from drafter.errors import DrafterError

log = logging.getLogger(__name__)

pyfuse3.asyncio.enable()

T = TypeVar("T")


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
        device = self.by_inode[fh]
        try:
            await device.ensure(off, size, Priority.DEMAND)
            return device.read(off, size)
        except (OSError, DrafterError) as e:
            log.error("read of %s failed: %s", device.name, e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
        device = self.by_inode[fh]
        try:
            await device.ensure(off, len(buf), Priority.DEMAND, partial_only=True)
            return device.write(off, buf)
        except DrafterError as e:
            log.error("write to %s failed: %s", device.name, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
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


class DeviceHost:
    """A thread with its own event loop: serves devices through FUSE, fetches chunks.

    Other threads hand it coroutines with :meth:`run` (from an event loop) or
    :meth:`run_sync`.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_loop_exception)
        self._thread = threading.Thread(target=self._serve, name="drafter-devices", daemon=True)
        self._thread.start()
        self._fuse_task: asyncio.Task[None] | None = None
        self._fs: DeviceFS | None = None
        self.mountpoint: Path | None = None

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return loops.submit(self.loop, coro)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the device loop and await it from another loop."""
        return await loops.run_on(self.loop, coro)

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    def mount(self, devices: list[Device], mountpoint: Path) -> None:
        """Serve ``devices`` as files under ``mountpoint`` (one mount per process)."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        fs = self._fs = DeviceFS(devices)

        async def start() -> None:
            options = set(pyfuse3.default_options) | {"fsname=drafter"}
            options.discard("default_permissions")
            pyfuse3.init(fs, str(mountpoint), options)
            self._fuse_task = asyncio.ensure_future(pyfuse3.main())

        try:
            self.run_sync(start(), 30)
        except Exception as e:
            raise DrafterError(f"cannot mount devices at {mountpoint}: {e}") from None
        self.mountpoint = mountpoint
        log.debug("devices mounted at %s", mountpoint)

    async def drop_cache(self, names: list[str]) -> None:
        """Drop the kernel's page cache of these devices' files (after their chunks were
        invalidated, so nothing reads a stale copy). Call on the device loop."""
        if self._fs is None:
            return
        for name in names:
            inode = self._fs.by_name.get(name.encode())
            if inode is not None:
                # Blocking call that may need the loop (writeback): off the loop.
                await asyncio.to_thread(pyfuse3.invalidate_inode, inode, False)

    def _inode(self, device: Device) -> int | None:
        """The inode of ``device``'s file in the mount (None: not mounted here)."""
        return self._fs.by_name.get(device.name.encode()) if self._fs is not None else None

    async def store_cache(self, device: Device, indices: list[int]) -> int:
        """Put these chunks of ``device`` (local ones; others are skipped) into the
        kernel's page cache of its file, so the VMM's first touches of them are page
        hits, not FUSE reads. Call on the device loop, only while the file is open (the
        kernel stores only for an inode it knows: QEMU holds it) and no VM runs on it
        (a stored page replaces whatever the page cache held there). Returns the
        number of chunks stored; DrafterError if the kernel refuses one (the cache may
        then hold part of them: drop it)."""
        inode = self._inode(device)
        if inode is None:
            return 0
        stored = 0
        for index in indices:
            if not device.local[index]:
                continue
            data, _ = device.read_chunk(index)
            try:
                pyfuse3.notify_store(inode, index * device.chunk_size, data)
            except OSError as e:
                raise DrafterError(
                    f"cannot store {device.name} chunks in the page cache: {e}"
                ) from None
            stored += 1
            if not stored % 64:
                await asyncio.sleep(0)  # let FUSE requests and the link through
        return stored

    async def store_cache_runs(
        self, device: Device, runs: dict[int, list[tuple[int, bytes]]]
    ) -> None:
        """Like :meth:`store_cache` for parts of chunks whose other bytes the page cache
        holds already: ``runs`` (chunk -> (offset in it, bytes)) replace only those."""
        inode = self._inode(device)
        if inode is None:
            return
        try:
            for index, chunk_runs in runs.items():
                for offset, data in chunk_runs:
                    pyfuse3.notify_store(inode, index * device.chunk_size + offset, data)
        except OSError as e:
            raise DrafterError(f"cannot store {device.name} pages in the page cache: {e}") from None

    def close(self) -> None:
        """Unmount, stop the loop and the thread; safe to call more than once."""
        if not self._thread.is_alive():
            return

        async def stop() -> None:
            if self._fuse_task is not None:
                pyfuse3.terminate()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._fuse_task, 10)
                with contextlib.suppress(Exception):
                    pyfuse3.close(unmount=True)
                self._fuse_task = None
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        try:
            self.run_sync(stop(), 30)
        except Exception as e:
            log.warning("unmounting %s: %s", self.mountpoint, e)
            if self.mountpoint is not None:
                lazy_unmount(self.mountpoint)
        loops.call_soon(self.loop, self.loop.stop)
        self._thread.join(10)
        if self.mountpoint is not None:
            with contextlib.suppress(OSError):
                self.mountpoint.rmdir()


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """pyfuse3's asyncio reader callback can fire for a read future that was cancelled
    while the mount shut down; that is harmless and must not print a traceback."""
    if isinstance(context.get("exception"), asyncio.InvalidStateError) and "set_result" in repr(
        context.get("handle")
    ):
        log.debug("ignored a late FUSE read callback at shutdown")
        return
    loop.default_exception_handler(context)


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
