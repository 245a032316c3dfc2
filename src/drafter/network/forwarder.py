"""Forward TCP ports on the host to VMs in drafter namespaces (a userspace proxy).

Each forward listens on a host address and, per accepted connection, connects to
the namespace's external address at the internal port and copies bytes both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drafter.errors import DrafterError
from drafter.network.state import DEFAULT_STATE_DIR, namespace_info

log = logging.getLogger(__name__)

DEFAULT_PORT_FORWARDS = (
    '[{"netns":"ark0","internalPort":"6379","protocol":"tcp","externalAddr":"127.0.0.1:3333"}]'
)
_BUFSIZE = 64 * 1024


@dataclass(frozen=True)
class PortForward:
    """One forward, as in the seed's ``--port-forwards`` JSON entries."""

    netns: str
    internal_port: int
    protocol: str
    external_host: str
    external_port: int

    @property
    def external_addr(self) -> str:
        """``host:port`` the forward listens on (IPv6 hosts in brackets)."""
        return _join(self.external_host, self.external_port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(value: Any, what: str) -> int:
    try:
        port = int(str(value), 10)
    except ValueError:
        raise DrafterError(f"invalid {what} {value!r}: not a number") from None
    if not 0 <= port <= 65535:
        raise DrafterError(f"invalid {what} {value!r}: out of range")
    return port


def _split_host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise DrafterError(f"invalid externalAddr {addr!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, _port(port, f"port in externalAddr {addr!r}")


def parse_port_forwards(text: str) -> list[PortForward]:
    """Parse the ``--port-forwards`` JSON; raise DrafterError with a one-line reason."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DrafterError(f"invalid --port-forwards JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise DrafterError("invalid --port-forwards: expected a non-empty JSON list")
    forwards = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DrafterError(f"invalid --port-forwards entry {i}: expected a JSON object")
        missing = [k for k in ("netns", "internalPort", "externalAddr") if k not in entry]
        if missing:
            raise DrafterError(f"invalid --port-forwards entry {i}: missing {', '.join(missing)}")
        protocol = str(entry.get("protocol", "tcp")).lower()
        if protocol != "tcp":
            raise DrafterError(
                f"--port-forwards entry {i}: protocol {protocol!r} is not supported (only tcp)"
            )
        host, port = _split_host_port(str(entry["externalAddr"]))
        forwards.append(
            PortForward(
                netns=str(entry["netns"]),
                internal_port=_port(entry["internalPort"], f"internalPort of entry {i}"),
                protocol=protocol,
                external_host=host,
                external_port=port,
            )
        )
    return forwards


@dataclass
class _Listener:
    forward: PortForward
    target_host: str
    server: asyncio.Server | None = None


class Forwarder:
    """Runs a set of :class:`PortForward` listeners on the running asyncio loop."""

    def __init__(
        self, forwards: list[PortForward], state_dir: str | Path = DEFAULT_STATE_DIR
    ) -> None:
        self.forwards = forwards
        self.state_dir = state_dir
        self._listeners: list[_Listener] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Resolve every namespace and bind every listener (all or nothing)."""
        listeners = [
            _Listener(f, namespace_info(f.netns, self.state_dir).external_address)
            for f in self.forwards
        ]
        try:
            for lst in listeners:
                lst.server = await self._listen(lst)
                self._listeners.append(lst)
        except BaseException:
            await self.close()
            raise

    async def _listen(self, lst: _Listener) -> asyncio.Server:
        f = lst.forward

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await self._proxy(lst, reader, writer)

        try:
            server = await asyncio.start_server(handle, f.external_host, f.external_port)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DrafterError(
                    f"cannot listen on {f.external_addr}: address already in use"
                ) from None
            raise DrafterError(f"cannot listen on {f.external_addr}: {e.strerror or e}") from None
        log.debug(
            "forwarding %s -> %s (%s:%d)",
            self.bound_addr(server) or f.external_addr,
            f.netns,
            lst.target_host,
            f.internal_port,
        )
        return server

    @staticmethod
    def bound_addr(server: asyncio.Server) -> str | None:
        """``host:port`` a server is bound to (useful with port 0)."""
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            return _join(str(ipaddress.ip_address(host)), int(port))
        return None

    @property
    def addresses(self) -> list[str]:
        """Bound ``host:port`` of every listener, in the order of :attr:`forwards`."""
        out = []
        for lst in self._listeners:
            addr = self.bound_addr(lst.server) if lst.server else None
            out.append(addr or lst.forward.external_addr)
        return out

    async def _proxy(
        self, lst: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        f = lst.forward
        peer = writer.get_extra_info("peername")
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(lst.target_host, f.internal_port), timeout=10
            )
        except (OSError, TimeoutError) as e:
            log.warning(
                "%s: cannot reach %s:%d in %s: %s",
                peer,
                lst.target_host,
                f.internal_port,
                f.netns,
                e,
            )
            writer.close()
            return
        log.debug("%s: connected to %s:%d (%s)", peer, lst.target_host, f.internal_port, f.netns)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
            log.debug("%s: closed", peer)

    async def close(self) -> None:
        """Stop listening and drop open connections."""
        for lst in self._listeners:
            if lst.server is not None:
                lst.server.close()
        for task in list(self._tasks):
            task.cancel()
        for lst in self._listeners:
            if lst.server is not None:
                with contextlib.suppress(Exception):
                    await lst.server.wait_closed()
        self._listeners = []

    async def serve_forever(self) -> None:
        """Run until cancelled (e.g. by Ctrl-C), then close."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_BUFSIZE):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def forward_ports(
    forwards: list[PortForward], state_dir: str | Path = DEFAULT_STATE_DIR
) -> Forwarder:
    """Start forwarding ``forwards``; the caller closes the returned :class:`Forwarder`."""
    fwd = Forwarder(forwards, state_dir)
    await fwd.start()
    return fwd
