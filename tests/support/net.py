"""Loopback ports, a TCP proxy whose connections a test can cut, and a namespace
whose host is gone from the network."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from pyroute2 import IPRoute

from drafter.network.state import NamespaceInfo

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


@contextlib.contextmanager
def host_gone(info: NamespaceInfo) -> Iterator[None]:
    """The namespace ``info`` as a host that is gone from the network: the host's route
    to its external address becomes unreachable (a connection fails at once and never
    leaves by the default route) and the namespace loses its default route (nothing in
    it reaches the store or anything else). Both routes are put back on exit, also
    when the test fails, since the session's other tests use the namespace."""
    target = f"{info.external_address}/32"
    with IPRoute() as ipr:
        (veth,) = ipr.link_lookup(ifname=info.host_veth)
        ipr.route("replace", dst=target, type="unreachable")
    try:
        with IPRoute(netns=info.namespace) as ipr:
            (inner,) = ipr.link_lookup(ifname=info.namespace_veth)
            ipr.route("del", dst="0.0.0.0/0", gateway=info.host_address, oif=inner)
        try:
            yield
        finally:
            with IPRoute(netns=info.namespace) as ipr:
                ipr.route("replace", dst="0.0.0.0/0", gateway=info.host_address, oif=inner)
    finally:
        with IPRoute() as ipr:
            ipr.route("replace", dst=target, gateway=info.namespace_address, oif=veth)


def unreachable(address: str, port: int) -> bool:
    """Whether a TCP connection to ``address`` fails at once (within a second)."""
    with socket.socket() as s:
        s.settimeout(1)
        try:
            s.connect((address, port))
        except OSError:
            return True
        return False
