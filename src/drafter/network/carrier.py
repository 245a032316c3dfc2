"""The daemon's watch on its taps: when a VM's QEMU lets go of the tap without its
process saying so (the process was killed, QEMU crashed), cut the host's connections
to that namespace's external address, as the process would have (see
:func:`drafter.network.follow.cut_connections`). New packets already get the kernel's
reset; this reaches the clients that wait for an answer and send nothing.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading

from drafter.errors import DrafterError
from drafter.network.follow import cut_connections, set_gate
from drafter.network.namespaces import in_namespace

log = logging.getLogger(__name__)

_RTMGRP_LINK = 1
_RTM_NEWLINK = 16
_IFF_LOWER_UP = 0x10000
_NLMSG = struct.Struct("=LHHLL")
_IFINFO = struct.Struct("=BxHiII")


class CarrierWatch(threading.Thread):
    """Watches the tap of each namespace (``namespace -> (tap, external address)``);
    with ``table``, also empties the ``closed`` set of the namespace's table (a source
    killed at switch-over left it there; without a VM the kernel resets anyway)."""

    def __init__(self, taps: dict[str, tuple[str, str]], table: str = "") -> None:
        super().__init__(name="carrier-watch", daemon=True)
        self._stopping = threading.Event()
        # One link-event socket per namespace, made in it (it stays there).
        self._watched: dict[socket.socket, tuple[int, str, str]] = {}
        self._carrier: dict[socket.socket, bool] = {}  # last seen (unknown at first)
        self._table = table
        for namespace, (tap, address) in taps.items():
            with in_namespace(namespace):
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
                try:
                    sock.bind((0, _RTMGRP_LINK))
                    index = socket.if_nametoindex(tap)
                except OSError as e:
                    sock.close()
                    raise DrafterError(f"cannot watch {tap} in {namespace}: {e}") from None
            self._watched[sock] = (index, namespace, address)

    def run(self) -> None:
        while not self._stopping.is_set():
            ready, _, _ = select.select(list(self._watched), [], [], 0.5)
            for sock in ready:
                try:
                    data = sock.recv(65536)
                except OSError as e:  # ENOBUFS: events were lost; the next ones count
                    log.debug("link events: %s", e)
                    continue
                index, namespace, address = self._watched[sock]
                carrier = self._carrier_in(data, index)
                if carrier is None:
                    continue
                was = self._carrier.get(sock)
                self._carrier[sock] = carrier
                if not carrier and was is not False:
                    log.debug("%s: no VM on the tap any more", namespace)
                    try:
                        cut_connections(address)
                        if self._table:
                            set_gate(namespace, self._table, address, closed=False)
                    except DrafterError as e:
                        log.warning("%s: %s", namespace, e)

    @staticmethod
    def _carrier_in(data: bytes, index: int) -> bool | None:
        """The carrier of link ``index`` in the last event about it in ``data``."""
        carrier = None
        offset = 0
        while offset + _NLMSG.size + _IFINFO.size <= len(data):
            length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
            if length < _NLMSG.size:
                break
            if kind == _RTM_NEWLINK:
                _, _, ifindex, flags, _ = _IFINFO.unpack_from(data, offset + _NLMSG.size)
                if ifindex == index:
                    carrier = bool(flags & _IFF_LOWER_UP)
            offset += (length + 3) & ~3
        return carrier

    def stop(self) -> None:
        """Stop watching and close the sockets."""
        self._stopping.set()
        if self.is_alive():
            self.join(5)
        for sock in self._watched:
            with contextlib.suppress(OSError):
                sock.close()
        self._watched.clear()
