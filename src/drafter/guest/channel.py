"""The guest side of a host channel: a named virtio-serial port.

The seed uses vsock ports; these hosts have no vhost-vsock, so each channel is a
virtio-serial port the VMM names (``drafter.agent``, ``drafter.liveness``). Another
transport only has to offer the same three methods.

When the host side is not connected (between a snapshot and a restore, or during a
migration) reads report hang-up; the channel then waits and tries again, so the
guest programs survive the host going away and coming back.
"""

from __future__ import annotations

import glob
import os
import select
import time

PORTS_GLOB = "/sys/class/virtio-ports/*/name"


def find_port(name: str, timeout: float = 60.0) -> str:
    """Device path (/dev/vportNpM) of the virtio-serial port called ``name``."""
    deadline = time.monotonic() + timeout
    while True:
        for entry in glob.glob(PORTS_GLOB):
            try:
                with open(entry) as f:
                    if f.read().strip() == name:
                        return "/dev/" + entry.split("/")[-2]
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"no virtio-serial port named {name}")
        time.sleep(0.2)


class SerialChannel:
    """Line-based messages over one virtio-serial port."""

    def __init__(self, name: str, timeout: float = 60.0) -> None:
        self.path = find_port(name, timeout)
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        self._buf = b""

    def send_line(self, line: str) -> None:
        data = (line + "\n").encode()
        while data:
            try:
                n = os.write(self.fd, data)
                data = data[n:]
            except BlockingIOError:
                select.select([], [self.fd], [], 0.5)
            except OSError:
                # Host side went away mid-write; the caller re-sends if it matters.
                time.sleep(0.2)
                return

    def read_line(self, timeout: float | None = None) -> str | None:
        """Next line from the host, or None on timeout. Waits out host disconnects."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                return None
            wait = 0.5 if left is None else min(0.5, left)
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            events = poller.poll(wait * 1000)
            if not events:
                continue
            _, ev = events[0]
            if ev & select.POLLIN:
                try:
                    chunk = os.read(self.fd, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    self._buf += chunk
                    continue
            # Hang-up: nobody on the host side right now. Wait for them.
            time.sleep(0.1)
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace")

    def close(self) -> None:
        os.close(self.fd)
