"""Loopback ports, and a TCP proxy whose connections a test can cut."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def nothing_listens(port: int) -> bool:
    """Whether a connection to ``port`` on loopback is refused."""
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) != 0


class CuttableProxy(threading.Thread):
    """Forwards TCP connections to ``target``; :meth:`cut` drops the open ones (new ones
    are forwarded again)."""

    def __init__(self, target: int) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        self.cuts = 0
        self.refuse_until = 0.0  # connections before this moment are closed at once
        self.start()

    def run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                if time.monotonic() < self.refuse_until:
                    client.close()
                    continue
                server = socket.create_connection((LOOPBACK, self.target))
                self.open += [client, server]
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Drop every open connection (both ends)."""
        self.cuts += 1
        sockets, self.open = self.open, []
        for s in sockets:
            # shutdown() ends the connection even while a pipe thread is blocked in
            # recv() on it (close() alone would wait for that thread).
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        """Stop listening and drop what is open."""
        self.listener.close()
        self.cut()
