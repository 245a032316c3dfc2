"""A generic chunk server: one TCP port serving all resources of one VM.

:class:`ChunkServer` serves any :class:`ChunkProvider` (a package for the registry, a
running VM's devices for a peer) over the protocol of :mod:`drafter.wire`. Each
connection has a reader task that queues requests and a sender that always answers
demand requests before queued background ones. A misbehaving client costs one
warning line and its connection; the others are not disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from drafter import wire
from drafter.errors import DrafterError
from drafter.wire import ErrorCode, MsgType, ProtocolError

log = logging.getLogger(__name__)

_READ_LIMIT = wire.MAX_BODY + wire.HEADER_SIZE  # stream buffer: one whole frame


class ChunkProvider(Protocol):
    """What a ChunkServer serves: named resources cut into chunks, plus a config."""

    chunk_size: int

    def manifest(self) -> dict[str, int]:
        """Resource name -> size in bytes, in the order clients should see them."""
        ...

    def config(self) -> bytes:
        """The package config (JSON bytes)."""
        ...

    async def read_chunk(self, resource: str, index: int) -> bytes:
        """Chunk ``index`` of ``resource``: ``chunk_size`` bytes, fewer only at the end."""
        ...


@dataclass
class ServerStats:
    """Counters over the server's lifetime (tests and benches read them)."""

    accepted: int = 0  # connections that passed the handshake
    refused: int = 0  # connections dropped for a protocol, TLS or auth problem
    chunks: int = 0  # chunks answered with data
    zero_chunks: int = 0  # chunks answered with the zero marker
    bytes: int = 0  # chunk payload bytes sent
    requests: dict[int, int] = field(default_factory=lambda: {0: 0, 1: 0})  # by priority


class _Gone(Exception):
    """The client went away; the message says how."""


class _Connection:
    """Per-connection request queues."""

    def __init__(self) -> None:
        self.demand: deque[tuple[int, int, int]] = deque()  # (request id, resource, index)
        self.background: deque[tuple[int, int, int]] = deque()
        self.wake = asyncio.Event()
        self.busy = False

    @property
    def outstanding(self) -> int:
        return len(self.demand) + len(self.background) + int(self.busy)


class ChunkServer:
    """Serve a ChunkProvider to many clients at once (asyncio).

    ``await start(host, port, ssl=..., token=...)``, read ``port``, ``await close()``.
    """

    handshake_timeout = 10.0  # seconds a client has for TLS, hello and auth
    linger_timeout = 1.0  # seconds to let an error frame reach the client before closing

    def __init__(self, provider: ChunkProvider) -> None:
        self.provider = provider
        chunk_size = provider.chunk_size
        if not 0 < chunk_size <= wire.MAX_CHUNK_SIZE:
            raise DrafterError(f"chunk size {chunk_size} is not in 1..{wire.MAX_CHUNK_SIZE}")
        self.chunk_size = chunk_size
        manifest = provider.manifest()
        self._names = list(manifest)
        self._sizes = [manifest[n] for n in self._names]
        self._chunks = [(s + chunk_size - 1) // chunk_size for s in self._sizes]
        self._welcome = wire.Welcome(chunk_size, dict(manifest), provider.config()).encode()
        if len(self._welcome) - wire.HEADER_SIZE > wire.MAX_BODY:
            raise DrafterError("the config and manifest do not fit in one frame")
        self._zero = bytes(chunk_size)
        self._server: asyncio.Server | None = None
        self._ssl: ssl_module.SSLContext | None = None
        self._token: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.stats = ServerStats()

    async def start(
        self,
        host: str | None,
        port: int,
        ssl: ssl_module.SSLContext | None = None,
        token: str | None = None,
    ) -> None:
        """Listen on ``host:port`` (host None or "" = all interfaces, port 0 = any free)."""
        self._ssl = ssl
        self._token = token or None
        self._closing = False
        if ssl is None:
            self._server = await asyncio.start_server(
                self._on_client, host or None, port, limit=_READ_LIMIT
            )
        else:
            # Reading stays paused from the first moment until TLS takes over the
            # connection, so no handshake byte can end up in a plain stream buffer.
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _TlsGate(self), host or None, port)

    @property
    def port(self) -> int:
        """The bound port (useful after ``start(..., 0)``)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def addresses(self) -> list[str]:
        """Every bound address as HOST:PORT."""
        if self._server is None:
            return []
        return [wire.format_addr(*s.getsockname()[:2]) for s in self._server.sockets]

    async def close(self) -> None:
        """Stop listening, tell connected clients we are shutting down, drop them."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # --- one connection ----------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = _peer(writer.transport)
        if self._ssl is None:
            log.debug("client %s connected", peer)
        problem: str | None = None
        error: tuple[ErrorCode, str] | None = None
        accepted = False
        try:
            await asyncio.wait_for(self._handshake(reader, writer), self.handshake_timeout)
            accepted = True
            self.stats.accepted += 1
            problem = await self._serve(reader, writer)
        except ProtocolError as e:
            problem = e.message
            error = (e.code, e.message)
        except TimeoutError:
            problem = "handshake timed out"
        except asyncio.IncompleteReadError as e:
            problem = "closed the connection mid-frame" if e.partial else "closed the connection"
            if not accepted:
                problem += " during the handshake"
        except (ConnectionError, OSError) as e:
            problem = f"connection failed: {_reason(e)}"
        except _Gone as e:
            problem = str(e)
        except DrafterError as e:  # the provider could not read a chunk
            log.error("client %s: cannot serve a chunk: %s", peer, e)
            error = (ErrorCode.INTERNAL, "the server cannot read that chunk")
        except asyncio.CancelledError:  # only close() cancels a connection
            error = (ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        except Exception as e:  # a bug: say so in one line, the server keeps serving
            log.error("client %s: unexpected %s: %s", peer, type(e).__name__, e,
                      exc_info=log.isEnabledFor(logging.DEBUG))  # fmt: skip
            error = (ErrorCode.INTERNAL, "internal server error")
        if problem is not None:
            if not accepted:
                self.stats.refused += 1
            log.warning("client %s: %s; dropped it", peer, problem)
        log.debug("client %s disconnected", peer)
        try:
            await self._shut(reader, writer, error)
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _accept_tls(self, transport: asyncio.Transport) -> None:
        """TLS first, then the protocol; a failed TLS handshake costs one line."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = _peer(transport)
        log.debug("client %s connected", peer)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        assert self._ssl is not None
        try:
            tls = await loop.start_tls(
                transport,
                protocol,
                self._ssl,
                server_side=True,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except asyncio.CancelledError:
            transport.abort()
            self._tasks.discard(task)
            return
        except (OSError, TimeoutError) as e:
            self.stats.refused += 1
            reason = _reason(e)
            if isinstance(e, (ConnectionResetError, BrokenPipeError)):
                reason = "the client dropped the connection (does it trust this certificate?)"
            log.warning("client %s: TLS handshake failed: %s; dropped it", peer, reason)
            transport.abort()
            self._tasks.discard(task)
            return
        if tls is None:  # the connection ended meanwhile
            self._tasks.discard(task)
            return
        protocol.connection_made(tls)
        await self._on_client(reader, asyncio.StreamWriter(tls, protocol, reader, loop))

    async def _shut(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        error: tuple[ErrorCode, str] | None,
    ) -> None:
        """Close a connection; an error frame first, given a moment to arrive."""
        with contextlib.suppress(Exception):
            if error is not None and not writer.is_closing():
                writer.write(wire.error_frame(*error))
                if writer.can_write_eof():
                    writer.write_eof()
                # Read what the client still sends, so closing does not reset the
                # connection before it has read the error frame.
                async with asyncio.timeout(self.linger_timeout):
                    while await reader.read(65536):
                        pass
        with contextlib.suppress(Exception):
            writer.transport.abort() if writer.is_closing() else writer.close()
            async with asyncio.timeout(self.linger_timeout):
                await writer.wait_closed()
        if not writer.is_closing():
            writer.transport.abort()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind, _, body = await wire.read_frame(reader, max_body=1024)
        if kind != MsgType.CLIENT_HELLO:
            raise ProtocolError(
                ErrorCode.PROTOCOL, f"expected a client hello, got frame type {kind}"
            )
        hello = wire.ClientHello.decode(body)
        if hello.version != wire.VERSION:
            raise ProtocolError(
                ErrorCode.VERSION,
                f"protocol version {hello.version} is not supported "
                f"(this server speaks version {wire.VERSION})",
            )
        token = self._token
        nonce = wire.new_nonce()
        proof = wire.server_proof(token, nonce, hello.nonce) if token else bytes(wire.PROOF_SIZE)
        writer.write(wire.ServerHello(wire.VERSION, token is not None, nonce, proof).encode())
        kind, _, body = await wire.read_frame(reader, max_body=1024)
        if kind != MsgType.AUTH:
            raise ProtocolError(ErrorCode.PROTOCOL, f"expected auth, got frame type {kind}")
        if token:
            if not body:
                raise ProtocolError(ErrorCode.AUTH, "a token is required")
            if not wire.proof_matches(body, wire.client_proof(token, nonce, hello.nonce)):
                raise ProtocolError(ErrorCode.AUTH, "wrong token")
        writer.write(self._welcome)
        await writer.drain()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> str | None:
        """Run the reader and the sender until either ends; a problem line or None."""
        conn = _Connection()
        writer.transport.set_write_buffer_limits(high=2 * self.chunk_size)
        receiving = asyncio.create_task(self._receive(reader, writer, conn))
        sending = asyncio.create_task(self._send(writer, conn))
        try:
            done, _ = await asyncio.wait({receiving, sending}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (receiving, sending):
                t.cancel()
            await asyncio.gather(receiving, sending, return_exceptions=True)
            closed = getattr(self.provider, "connection_closed", None)
            if closed is not None:
                closed(conn)
        first = receiving if receiving in done else sending
        exc = first.exception()
        if exc is not None:
            raise exc
        # The client closed its side cleanly.
        if conn.outstanding:
            return f"closed the connection with {conn.outstanding} request(s) unanswered"
        return None

    async def _receive(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection
    ) -> None:
        stats = self.stats
        while True:
            try:
                kind, request_id, body = await wire.read_frame(reader)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise
                return
            if kind == MsgType.REQUEST:
                req = wire.Request.decode(body)
                if req.resource >= len(self._names):
                    raise ProtocolError(
                        ErrorCode.BAD_REQUEST, f"request for unknown resource #{req.resource}"
                    )
                if req.index >= self._chunks[req.resource]:
                    name = self._names[req.resource]
                    raise ProtocolError(
                        ErrorCode.BAD_REQUEST,
                        f"request for chunk {req.index} of {name}, beyond its end "
                        f"({self._chunks[req.resource]} chunks)",
                    )
                if conn.outstanding >= wire.MAX_OUTSTANDING:
                    raise ProtocolError(ErrorCode.TOO_MANY, "too many outstanding requests")
                item = (request_id, req.resource, req.index)
                if req.priority == wire.Priority.DEMAND:
                    conn.demand.append(item)
                elif req.priority == wire.Priority.BACKGROUND:
                    conn.background.append(item)
                else:
                    raise ProtocolError(ErrorCode.BAD_REQUEST, f"bad priority {req.priority}")
                stats.requests[req.priority] += 1
                conn.wake.set()
            elif kind == MsgType.ERROR:
                code, message = wire.decode_error(body)
                raise _Gone(f"reported {wire.error_name(code)}: {message}")
            elif wire.is_control(kind):
                control = getattr(self.provider, "control", None)
                if control is None:
                    raise ProtocolError(
                        ErrorCode.REFUSED, f"this server takes no control call {kind}"
                    )
                # Answered inline: one control call at a time per connection.
                reply = await control(conn, kind, body)
                writer.write(wire.frame(kind, reply, request_id))
            else:
                raise ProtocolError(ErrorCode.PROTOCOL, f"unexpected frame type {kind}")

    async def _send(self, writer: asyncio.StreamWriter, conn: _Connection) -> None:
        provider = self.provider
        stats = self.stats
        chunk_size = self.chunk_size
        zero = self._zero
        while True:
            if conn.demand:
                request_id, resource, index = conn.demand.popleft()
            elif conn.background:
                request_id, resource, index = conn.background.popleft()
            else:
                conn.wake.clear()
                await conn.wake.wait()
                continue
            conn.busy = True
            name = self._names[resource]
            expected = min(chunk_size, self._sizes[resource] - index * chunk_size)
            try:
                data = await provider.read_chunk(name, index)
            except OSError as e:
                raise DrafterError(f"{name} chunk {index}: {_reason(e)}") from None
            if len(data) != expected:
                raise DrafterError(f"{name} chunk {index}: got {len(data)} bytes, not {expected}")
            if data == zero if expected == chunk_size else data == bytes(expected):
                writer.write(wire.zero_frame(request_id, expected))
                stats.zero_chunks += 1
            else:
                # Two writes, not one joined copy: each usually goes straight to send().
                writer.write(wire.header(MsgType.CHUNK, expected, request_id))
                writer.write(data)
                stats.chunks += 1
                stats.bytes += expected
            conn.busy = False
            await writer.drain()


class _TlsGate(asyncio.Protocol):
    """Holds a new connection with reading paused until its TLS handshake starts."""

    def __init__(self, server: ChunkServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self.server._accept_tls(transport))
        self.server._tasks.add(task)


def _peer(transport: asyncio.BaseTransport) -> str:
    peername = transport.get_extra_info("peername")
    return wire.format_addr(*peername[:2]) if peername else "?"


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl_module.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
