"""A chunk server: one TCP port serving all resources of one VM (protocol v2).

:class:`ChunkServer` serves any :class:`ChunkProvider` (a package for the registry, a
running VM's devices for a peer). After the handshake it sends the resources, every
chunk's hash and the hot chunks; then each connection has a reader that queues
requests and a sender that always answers demand requests before background ones.

The server is meant to be left running on a shared network: it holds at most
``limits.max_connections`` clients, shared fairly between addresses when they run out
(:mod:`drafter.transport.admission`: handshakes that linger go first, then the idle
connections of the address holding the most), and pauses accepting (without
spinning) when the process runs out of descriptors; every connection has a handshake
deadline, an idle timeout and a write-stall timeout, at most ``MAX_OUTSTANDING``
requests and a small send buffer. A misbehaving client costs one warning line and its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import zstandard

from drafter.chunks import chunk_length
from drafter.errors import DrafterError
from drafter.hashes import digest, is_zero
from drafter.transport import handshake, security
from drafter.transport import protocol as wire
from drafter.transport.admission import Admission, Slot
from drafter.transport.channel import Channel, FrameProtocol
from drafter.transport.protocol import ChunkHead, ErrorCode, MsgType, ProtocolError
from drafter.transport.sockets import descriptor_room, host_of, listen, peer_of, reason

if TYPE_CHECKING:
    from drafter.metrics import Metrics

log = logging.getLogger(__name__)

# Parsed client frames the server holds before it stops reading from that client
# (clients send small frames; one that sends faster than it reads is held back here).
_QUEUE_LIMIT = 64 * 1024
# Connections beyond the cap that may be open at once only to be told FULL, or while
# one that made room for them says its last word (bounds the descriptors a flood takes).
_OVERFLOW = 16


class ChunkProvider(Protocol):
    """What a ChunkServer serves: named resources cut into chunks, plus a config."""

    chunk_size: int

    def manifest(self) -> dict[str, int]:
        """Resource name -> size in bytes, in the order clients should see them."""
        ...

    def config(self) -> bytes:
        """The package config (JSON bytes)."""
        ...

    async def hashes(self, resource: str) -> list[bytes]:
        """The hash of every chunk of ``resource`` as it is now (ZERO_HASH: all zeros)."""
        ...

    def hot(self) -> dict[str, list[int]]:
        """Chunks a resumed VM touches first, per resource (sent before anything else)."""
        ...

    async def read_chunk(self, resource: str, index: int) -> tuple[bytes, bytes | None]:
        """Chunk ``index`` of ``resource`` and its hash if known (None: compute it)."""
        ...


class ControlHandler(Protocol):
    """What answers a server's control calls (16-47, other than PING): a migration
    source (:class:`drafter.migration.MigrationSource`). A server without one (a
    registry) refuses them."""

    async def control(self, conn: Connection, kind: int, body: bytes) -> bytes:
        """The answer's body to the call ``kind`` on ``conn``; ProtocolError refuses it
        (its code goes to the client in an ERROR frame, and the connection closes)."""
        ...

    def connection_closed(self, conn: Connection) -> None:
        """``conn`` ended (whatever the reason); called once, after its last call."""
        ...


@dataclass
class ServerLimits:
    """What one client may cost. The defaults suit a server left running."""

    max_connections: int = 256  # lowered to fit the descriptor limit
    handshake_timeout: float = 10.0  # TLS, hello and proof
    idle_timeout: float = 120.0  # no frame either way (clients ping every 30 s)
    write_stall_timeout: float = 30.0  # the client does not read what it asked for
    max_outstanding: int = wire.MAX_OUTSTANDING
    send_buffer_chunks: int = 2  # chunks the server buffers per connection


@dataclass
class ServerStats:
    """Counters over the server's lifetime (tests, benches and metrics read them)."""

    accepted: int = 0  # connections that passed the handshake
    full: int = 0  # connections refused for want of a slot (ErrorCode.FULL)
    evicted: int = 0  # connections closed to make room for another client
    refused: int = 0  # connections dropped for a protocol, TLS or auth problem
    auth_failures: int = 0
    chunks: int = 0  # chunks answered with data
    zero_chunks: int = 0  # chunks answered with the zero marker
    compressed_chunks: int = 0
    bytes: int = 0  # logical chunk bytes sent (zero markers not counted)
    wire_bytes: int = 0  # chunk payload bytes put on the wire (after compression)
    requests: dict[int, int] = field(default_factory=lambda: {0: 0, 1: 0})  # by priority
    connections: int = 0  # open right now


class _Gone(Exception):
    """The client went away or stalled; the message says how."""


class Connection:
    """Per-connection state: request queues and what the client negotiated."""

    def __init__(self, peer: str, compress: bool, parts: bool = False) -> None:
        self.peer = peer
        self.compress = compress
        # The most a control call's answer may hold: it said it takes PART frames.
        self.answer_limit = wire.MAX_ANSWER if parts else wire.MAX_BODY
        # (request id, resource, next index, chunks left), answered one chunk at a time
        self.demand: deque[tuple[int, int, int, int]] = deque()
        self.prefetch: deque[tuple[int, int, int, int]] = deque()
        self.background: deque[tuple[int, int, int, int]] = deque()
        self.wake = asyncio.Event()
        self.busy = False
        self.in_call = False  # a control call is being answered (it counts as outstanding)
        self.last_activity = time.monotonic()  # any frame either way
        self.last_work = self.last_activity  # a request, a control call or a chunk sent

    @property
    def outstanding(self) -> int:
        queued = len(self.demand) + len(self.prefetch) + len(self.background)
        return queued + int(self.busy) + int(self.in_call)

    def priority_of(self, queue: deque[tuple[int, int, int, int]]) -> wire.Priority:
        if queue is self.demand:
            return wire.Priority.DEMAND
        return wire.Priority.PREFETCH if queue is self.prefetch else wire.Priority.BACKGROUND


class ChunkServer:
    """Serve a ChunkProvider to many clients at once (asyncio).

    ``await start(host, port, ssl=..., token=...)``, read ``port``, ``await close()``.
    """

    linger_timeout = 1.0  # seconds to let an error frame reach the client before closing

    def __init__(
        self,
        provider: ChunkProvider,
        limits: ServerLimits | None = None,
        control: ControlHandler | None = None,
    ) -> None:
        self.provider = provider
        self.control = control  # answers control calls (None: refused)
        self.limits = limits or ServerLimits()
        # Below the descriptor limit, with room for the provider's own files.
        self.max_connections = max(1, min(self.limits.max_connections, descriptor_room() - 64))
        chunk_size = provider.chunk_size
        if not 0 < chunk_size <= wire.MAX_CHUNK_SIZE:
            raise DrafterError(f"chunk size {chunk_size} is not in 1..{wire.MAX_CHUNK_SIZE}")
        self.chunk_size = chunk_size
        manifest = provider.manifest()
        if len(manifest) > wire.MAX_RESOURCES:
            raise DrafterError(f"at most {wire.MAX_RESOURCES} resources can be served")
        self._names = list(manifest)
        self._sizes = [manifest[n] for n in self._names]
        self._chunks = [wire.chunk_count(s, chunk_size) for s in self._sizes]
        if sum(self._chunks) > wire.MAX_CHUNKS:
            raise DrafterError(
                f"{sum(self._chunks)} chunks of {chunk_size} bytes are more than a client "
                f"takes ({wire.MAX_CHUNKS}): use larger chunks"
            )
        self._config = provider.config()
        self._hot: tuple[dict[str, list[int]], bytes] | None = None  # a hot set, encoded
        if len(self._config) > wire.MAX_BODY - 4096:
            raise DrafterError("the config does not fit in one frame")
        self._sockets: list[socket.socket] = []
        self._ssl: ssl_module.SSLContext | None = None
        self._token: str | None = None
        self._local = False  # _token is the host-local token
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.max_connections + _OVERFLOW)
        self.admission = Admission(self.max_connections, self._evict)
        self._full_warned = 0.0
        self._closing = False
        self._descriptors_warned = 0.0
        self._freed = asyncio.Event()  # a connection closed (accepting may work again)
        self._compressor = zstandard.ZstdCompressor(level=1)
        self.stats = ServerStats()
        self.metrics: Metrics | None = None  # drafter.metrics: counts each chunk sent

    async def start(
        self,
        host: str | None,
        port: int,
        ssl: ssl_module.SSLContext | None = None,
        token: str | None = None,
        more: Sequence[tuple[str, int]] = (),
        local_token: str | None = None,
    ) -> None:
        """Listen on ``host:port`` (host None or "" = all interfaces, port 0 = any free),
        and on each of ``more`` too (the same resources on every address). Clients
        prove they hold ``token``; without one, ``local_token`` (the host-local token,
        drafter.transport.localtoken), which the hello names as such. DrafterError if
        the token is not one ``drafter-token`` makes."""
        self._ssl = ssl
        self._local = not token and bool(local_token)
        token = token or local_token
        self._token = security.check_token(token, "the server's caller") if token else None
        self._closing = False
        sockets: list[socket.socket] = []
        try:
            for h, p in [(host or "", port), *more]:
                sockets += listen(h or "", p)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self._sockets = sockets
        for sock in self._sockets:
            self._track(asyncio.create_task(self._accept(sock)))

    @property
    def port(self) -> int:
        """The bound port (useful after ``start(..., 0)``)."""
        if not self._sockets:
            raise RuntimeError("the server is not started")
        return int(self._sockets[0].getsockname()[1])

    @property
    def addresses(self) -> list[str]:
        """Every bound address as HOST:PORT."""
        return [wire.format_addr(*s.getsockname()[:2]) for s in self._sockets]

    async def close(self) -> None:
        """Stop listening, tell connected clients we are shutting down, drop them."""
        self._closing = True
        for sock in self._sockets:
            sock.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sockets = []

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- accepting -----------------------------------------------------------------

    async def _accept(self, sock: socket.socket) -> None:
        """Accept while there is a free slot; pause (not spin) when descriptors run out."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            await self._slots.acquire()
            try:
                client, _addr = await loop.sock_accept(sock)
            except OSError as e:
                self._slots.release()
                if self._closing:
                    return
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    now = time.monotonic()
                    if now - self._descriptors_warned > 60:
                        self._descriptors_warned = now
                        log.warning("out of file descriptors: not accepting for now")
                    # Until one of our connections closes (freeing one), at most 0.5 s.
                    self._freed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await self._freed.wait()
                else:
                    log.warning("accept failed: %s", e.strerror or e)
                    await asyncio.sleep(0.1)
                continue
            except BaseException:
                self._slots.release()
                raise
            slot = self.admission.admit(host_of(client))
            task = asyncio.create_task(self._on_socket(client, slot))
            if slot is not None:
                slot.task = task
            self._track(task)

    def _evict(self, slot: Slot) -> None:
        """Close ``slot``'s connection: it made room for another client."""
        self.stats.evicted += 1
        self._say_full(f"closing a connection from {slot.address} to make room")
        if slot.task is not None:
            slot.task.cancel()

    def _say_full(self, what: str) -> None:
        """One warning a minute while the server is full, not one per connection."""
        now = time.monotonic()
        if now - self._full_warned > 60:
            self._full_warned = now
            log.warning("all %d connection slots are taken: %s (per address: %s)",
                        self.max_connections, what,
                        dict(self.admission.per_address().most_common(4)))  # fmt: skip

    async def _on_socket(self, client: socket.socket, slot: Slot | None) -> None:
        self.stats.connections += 1
        try:
            peer = peer_of(client)
            loop = asyncio.get_running_loop()
            proto = FrameProtocol(queue_limit=_QUEUE_LIMIT)
            try:
                transport, _ = await loop.connect_accepted_socket(
                    lambda: proto,
                    client,
                    ssl=self._ssl,
                    ssl_handshake_timeout=self.limits.handshake_timeout if self._ssl else None,
                )
            except asyncio.CancelledError:
                client.close()
                raise
            except (OSError, TimeoutError, ssl_module.SSLError) as e:
                self.stats.refused += 1
                client.close()
                why = reason(e)
                if isinstance(e, (ConnectionResetError, BrokenPipeError)):
                    why = "the client dropped the connection (does it trust this certificate?)"
                log.warning("client %s: TLS handshake failed: %s; dropped it", peer, why)
                return
            assert isinstance(transport, asyncio.Transport)
            channel = Channel(transport, proto)
            if slot is None:  # full, and no one to make room: told so, and dropped
                self.stats.refused += 1
                self.stats.full += 1
                self._say_full(f"refusing {peer}")
                await self._shut(channel, (ErrorCode.FULL, "the server is full: try again"))
                return
            await self._on_client(peer, channel, slot)
        finally:
            if slot is not None:
                self.admission.release(slot)
            self.stats.connections -= 1
            self._slots.release()
            self._freed.set()

    # --- one connection ----------------------------------------------------------

    async def _on_client(self, peer: str, channel: Channel, slot: Slot) -> None:
        log.debug("client %s connected", peer)
        problem: str | None = None
        error: tuple[ErrorCode, str] | None = None
        accepted = False
        try:
            async with asyncio.timeout(self.limits.handshake_timeout):
                conn = await self._handshake(peer, channel, slot)
            accepted = True
            self.stats.accepted += 1
            problem = await self._serve(channel, conn)
        except ProtocolError as e:
            problem = e.message
            error = (e.code, e.message)
            if e.code == ErrorCode.AUTH:
                self.stats.auth_failures += 1
        except TimeoutError:
            problem = "timed out" if accepted else "handshake timed out"
            error = (ErrorCode.TIMEOUT, problem)
        except asyncio.IncompleteReadError as e:
            problem = "closed the connection mid-frame" if e.partial else "closed the connection"
            if not accepted:
                problem += " during the handshake"
        except (ConnectionError, OSError) as e:
            problem = f"connection failed: {reason(e)}"
        except _Gone as e:
            problem = str(e)
        except DrafterError as e:  # the provider could not read a chunk
            log.error("client %s: cannot serve a chunk: %s", peer, e)
            error = (ErrorCode.INTERNAL, "the server cannot read that chunk")
        except asyncio.CancelledError:  # close(), or another client needed the slot
            if slot.evicted and not self._closing:
                problem = "closed to make room for another client"
                error = (ErrorCode.FULL, "the server is full: this connection made room")
            else:
                error = (ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        except Exception as e:  # a bug: say so in one line, the server keeps serving
            log.error("client %s: unexpected %s: %s", peer, type(e).__name__, e,
                      exc_info=log.isEnabledFor(logging.DEBUG))  # fmt: skip
            error = (ErrorCode.INTERNAL, "internal server error")
        if problem is not None and not accepted:
            self.stats.refused += 1
        if problem == "closed the connection during the handshake":
            log.debug("client %s connected and left without a word", peer)  # a port probe
        elif problem is not None:
            log.warning("client %s: %s; dropped it", peer, problem)
        log.debug("client %s disconnected", peer)
        try:
            await self._shut(channel, error)
        except asyncio.CancelledError:
            channel.abort()

    async def _shut(self, channel: Channel, error: tuple[ErrorCode, str] | None) -> None:
        """Close a connection; an error frame first, given a moment to arrive."""
        with contextlib.suppress(Exception):
            if error is not None and not channel.is_closing():
                channel.write(MsgType.ERROR, wire.error_body(*error))
                channel.flush()
                if channel.transport.can_write_eof():
                    channel.transport.write_eof()
                # Drop what the client still sends, so closing does not reset the
                # connection before it has read the error frame.
                async with asyncio.timeout(self.linger_timeout):
                    await channel.protocol.until_eof()
        await channel.close(self.linger_timeout)

    async def _handshake(self, peer: str, channel: Channel, slot: Slot) -> Connection:
        """Hellos and proofs, then the welcome, every chunk's hash and the hot chunks."""
        accepted = await handshake.accept(
            channel, self._token, tls=self._ssl is not None, local=self._local
        )
        conn = Connection(peer, accepted.compress, parts=accepted.parts)
        slot.authenticated = True  # from here on, only idleness can cost it its slot
        slot.last_work = lambda: conn.last_work
        slot.busy = lambda: conn.outstanding > 0
        server_proof = accepted.proof
        manifest = dict(zip(self._names, self._sizes, strict=True))
        channel.write(
            MsgType.WELCOME,
            wire.Welcome(server_proof, self.chunk_size, manifest, self._config).body(),
        )
        for r, name in enumerate(self._names):
            hashes = await self.provider.hashes(name)
            if len(hashes) != self._chunks[r]:
                raise DrafterError(f"{name}: {len(hashes)} hashes for {self._chunks[r]} chunks")
            step = wire.MAX_HASHES_PER_FRAME
            for start in range(0, max(1, len(hashes)), step):
                part = b"".join(hashes[start : start + step])
                channel.write(MsgType.HASHES, wire.Hashes(r, start, part).body())
                await self._drain(channel)
        channel.write(MsgType.HOT, self._hot_body(self.provider.hot()))
        await self._drain(channel)
        return conn

    def _hot_body(self, hot: dict[str, list[int]]) -> bytes:
        """The HOT frame's body for the provider's hot set: encoded once per hot set
        (a registry's never changes; a peer's may while its VM records one), and cut
        to one frame, with a warning, rather than sent whole for every client to
        refuse (a registry refuses such a package when it opens it)."""
        if self._hot is not None and hot == self._hot[0]:  # a compare, not an encoding
            return self._hot[1]
        positions: dict[int, list[int]] = {}
        for name, indices in hot.items():
            if name in self._names:
                r = self._names.index(name)
                positions[r] = [i for i in indices if 0 <= i < self._chunks[r]]
        fitted, cut = wire.fit_hot(positions)
        if cut:
            log.warning(
                "the hot set (%d chunks) does not fit in one frame: sending its first %d",
                sum(map(len, positions.values())), sum(map(len, fitted.values())),
            )  # fmt: skip
        # A copy: a provider may change its lists in place.
        self._hot = ({name: list(v) for name, v in hot.items()}, wire.encode_hot(fitted))
        return self._hot[1]

    async def _drain(self, channel: Channel) -> None:
        if not channel.must_wait():
            channel.flush()
            return
        try:
            async with asyncio.timeout(self.limits.write_stall_timeout):
                await channel.drain()
        except TimeoutError:
            raise _Gone(
                f"did not read for {self.limits.write_stall_timeout:g} s (write stalled)"
            ) from None

    async def _serve(self, channel: Channel, conn: Connection) -> str | None:
        """Run the reader, the sender and the idle watch until one ends."""
        channel.transport.set_write_buffer_limits(
            high=self.limits.send_buffer_chunks * self.chunk_size
        )
        receiving = asyncio.create_task(self._receive(channel, conn))
        sending = asyncio.create_task(self._send(channel, conn))
        watching = asyncio.create_task(self._watch_idle(conn))
        tasks = {receiving, sending, watching}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.control is not None:
                self.control.connection_closed(conn)
        first = next(t for t in (receiving, sending, watching) if t in done)
        exc = first.exception()
        if exc is not None:
            raise exc
        # The client closed its side cleanly.
        if conn.outstanding:
            return f"closed the connection with {conn.outstanding} request(s) unanswered"
        return None

    async def _watch_idle(self, conn: Connection) -> None:
        idle = self.limits.idle_timeout
        while True:
            await asyncio.sleep(max(0.05, min(5.0, idle / 4)))
            if not conn.outstanding and time.monotonic() - conn.last_activity > idle:
                raise ProtocolError(ErrorCode.TIMEOUT, f"idle for {idle:g} s")

    async def _receive(self, channel: Channel, conn: Connection) -> None:
        stats = self.stats
        while True:
            try:
                kind, request_id, body = await channel.read()
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise
                return
            conn.last_activity = time.monotonic()
            if kind == MsgType.REQUEST:
                req = wire.Request.decode(body)
                if req.resource >= len(self._names):
                    raise ProtocolError(
                        ErrorCode.BAD_REQUEST, f"request for unknown resource #{req.resource}"
                    )
                if req.index + req.count > self._chunks[req.resource]:
                    name = self._names[req.resource]
                    raise ProtocolError(
                        ErrorCode.BAD_REQUEST,
                        f"request for chunk {req.index + req.count - 1} of {name}, beyond its "
                        f"end ({self._chunks[req.resource]} chunks)",
                    )
                if conn.outstanding >= self.limits.max_outstanding:
                    raise ProtocolError(
                        ErrorCode.TOO_MANY,
                        f"more than {self.limits.max_outstanding} outstanding requests",
                    )
                item = (request_id, req.resource, req.index, req.count)
                conn.last_work = conn.last_activity
                if req.priority == wire.Priority.DEMAND:
                    conn.demand.append(item)
                elif req.priority == wire.Priority.PREFETCH:
                    conn.prefetch.append(item)
                elif req.priority == wire.Priority.BACKGROUND:
                    conn.background.append(item)
                else:
                    raise ProtocolError(ErrorCode.BAD_REQUEST, f"bad priority {req.priority}")
                stats.requests[req.priority] = stats.requests.get(req.priority, 0) + 1
                conn.wake.set()
            elif kind == MsgType.ERROR:
                code, message = wire.decode_error(body)
                raise _Gone(f"reported {wire.error_name(code)}: {message}")
            elif kind == MsgType.PING:
                channel.write(MsgType.PING, b"", request_id)
                await self._drain(channel)  # a client that does not read is dropped
            elif wire.is_control(kind):
                control = self.control
                if control is None:
                    raise ProtocolError(
                        ErrorCode.REFUSED, f"this server takes no control call {kind}"
                    )
                # Answered inline: one control call at a time per connection.
                conn.last_work = conn.last_activity
                conn.in_call = True
                try:
                    reply = await control.control(conn, kind, bytes(body))
                finally:
                    conn.in_call = False
                await self._answer(channel, conn, kind, reply, request_id)
            else:
                raise ProtocolError(ErrorCode.PROTOCOL, f"unexpected frame type {kind}")

    async def _answer(
        self, channel: Channel, conn: Connection, kind: int, reply: bytes, request_id: int
    ) -> None:
        """A control call's answer: one frame, or PART frames then the last one."""
        if len(reply) > conn.answer_limit:  # made for a client that took PART frames
            raise ProtocolError(
                ErrorCode.REFUSED, f"an answer of {len(reply)} bytes needs PART frames"
            )
        view = memoryview(reply)
        while len(view) > wire.MAX_BODY:
            channel.write(MsgType.PART, bytes(view[: wire.MAX_BODY]), request_id)
            await self._drain(channel)
            view = view[wire.MAX_BODY :]
        channel.write(kind, bytes(view), request_id)
        await self._drain(channel)

    async def _send(self, channel: Channel, conn: Connection) -> None:
        provider = self.provider
        stats = self.stats
        chunk_size = self.chunk_size
        while True:
            # Demand first, then prefetch, then background; re-checked between the
            # chunks of a run.
            queue = conn.demand or conn.prefetch or conn.background
            if not queue:
                conn.wake.clear()
                await conn.wake.wait()
                continue
            request_id, r, index, count = queue.popleft()
            if count > 1:
                queue.appendleft((request_id, r, index + 1, count - 1))
            conn.busy = True
            name = self._names[r]
            expected = chunk_length(self._sizes[r], chunk_size, index)
            try:
                data, known = await provider.read_chunk(name, index)
            except OSError as e:
                raise DrafterError(f"{name} chunk {index}: {reason(e)}") from None
            if len(data) != expected:
                raise DrafterError(f"{name} chunk {index}: got {len(data)} bytes, not {expected}")
            zero = known == wire.ZERO_HASH or (known is None and is_zero(data))
            if zero:
                channel.write_chunk(
                    request_id, ChunkHead(r, wire.CHUNK_ZERO, index, expected, wire.ZERO_HASH)
                )
                stats.zero_chunks += 1
            else:
                flags = 0
                payload = data
                if conn.compress:
                    packed = self._compressor.compress(data)
                    if len(packed) < len(data) - len(data) // 8:  # only where it pays
                        flags, payload = wire.CHUNK_ZSTD, packed
                        stats.compressed_chunks += 1
                head = ChunkHead(r, flags, index, expected, known or digest(data))
                channel.write_chunk(request_id, head, payload)
                stats.chunks += 1
                stats.bytes += expected
                stats.wire_bytes += len(payload)
            if self.metrics is not None:
                sent = 0 if zero else len(payload)  # 0: the zero marker
                self.metrics.chunk_served(name, conn.priority_of(queue), expected, sent)
            conn.busy = False
            conn.last_activity = conn.last_work = time.monotonic()
            await self._drain(channel)
