"""Sockets of a server: listening ones, the name of the peer of an accepted one, the
descriptors left, and a failure's reason in a few words."""

from __future__ import annotations

import errno
import resource
import socket
import ssl as ssl_module

from drafter.transport import protocol as wire


def descriptor_room() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host`` ("" = every interface, IPv6 too where possible)."""
    if host == "":
        if socket.has_dualstack_ipv6():
            sock = socket.create_server(
                ("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128
            )
        else:
            sock = socket.create_server(("", port), backlog=128)
    else:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host}")
        family, _, _, _, addr = infos[0]
        sock = socket.create_server(addr[:2], family=family, backlog=128)
    sock.setblocking(False)
    return [sock]


def host_of(sock: socket.socket) -> str:
    """The address (no port) of the other end of ``sock``; "?" if it is gone."""
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


def peer_of(sock: socket.socket) -> str:
    try:
        peername = sock.getpeername()
    except OSError:
        return "?"
    return wire.format_addr(*peername[:2])


def reason(e: BaseException) -> str:
    if isinstance(e, ssl_module.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
