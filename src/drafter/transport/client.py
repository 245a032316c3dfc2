"""The client side of the wire protocol: chunks of a remote VM's resources.

One :class:`RemoteSource` keeps one connection to a registry or peer and multiplexes
any number of concurrent fetches over it by request id. Demand fetches (the VM waits)
are sent at once; background fetches share a *window* of bytes in flight that grows
as answers arrive (slow start, up to :data:`MAX_WINDOW`), so a pull keeps a long link
full instead of waiting a round trip per chunk. Every chunk is verified before it is
returned: its bytes must match the BLAKE3 hash that came with it, and that hash must
match the one the manifest (or the caller) expects. A dropped connection is
re-established with exponential backoff for at most ``retry_timeout`` seconds while
fetches wait; unanswered requests are sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zstandard

from drafter.errors import DrafterError
from drafter.transport import protocol as wire
from drafter.transport import security
from drafter.transport.channel import Channel, FrameProtocol
from drafter.transport.hashes import digest
from drafter.transport.protocol import ChunkHead, ErrorCode, MsgType, Priority, ProtocolError

if TYPE_CHECKING:
    from drafter.metrics import Metrics

__all__ = ["ChunkData", "Priority", "RemoteSource", "VerificationError"]

# A chunk's bytes as received: a view into the frame it came in (no copy).
ChunkData = bytes | bytearray | memoryview

log = logging.getLogger(__name__)

_BACKOFF_START = 0.05
_BACKOFF_MAX = 2.0
INITIAL_WINDOW = 16 << 20  # requests wait at the server, where demand overtakes them
MAX_WINDOW = 128 << 20
_MAX_BACKGROUND_REQUESTS = wire.MAX_OUTSTANDING - 64  # room for demand requests
# Requests of every priority together stay under the server's limit; prefetches and
# background requests leave room for demand ones.
_MAX_REQUESTS = wire.MAX_OUTSTANDING - 16
_MAX_QUEUED_REQUESTS = wire.MAX_OUTSTANDING - 128
COMPRESS_RTT = 0.002  # "auto" asks for compressed chunks from this round-trip time on
PING_INTERVAL = 30.0


class VerificationError(DrafterError):
    """A chunk's bytes did not match its hash: never handed to the VM."""


class _Transient(Exception):
    """A connection problem that reconnecting may cure."""


# Receives one verified chunk of a run: (index, bytes, hash).
Deliver = Callable[[int, ChunkData, bytes], None]


@dataclass(eq=False)
class _Pending:
    """A request for ``count`` consecutive chunks from ``index``, answered in order."""

    resource: int
    index: int  # the next chunk to arrive
    count: int  # chunks still to arrive
    priority: int
    expected: deque[bytes | None]  # the hash each chunk still to arrive must have
    deliver: Deliver
    future: asyncio.Future[None]
    windowed: int = 0  # bytes of it still counted in the window
    sent: float = 0.0  # loop time it was first sent (fetch latency counts reconnects too)


@dataclass(eq=False)
class _Conn:
    channel: Channel
    last_progress: float = 0.0
    last_sent: float = 0.0
    dead: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass
class _Greeting:
    """What a server says after the hellos: resources, hashes, hot chunks."""

    welcome: wire.Welcome
    hashes: dict[str, list[bytes]]
    hot: dict[str, list[int]]
    rtt: float


@dataclass
class ClientStats:
    chunks: int = 0  # chunks fetched with data
    zero_chunks: int = 0  # chunks that arrived as the zero marker
    bytes: int = 0  # logical bytes of fetched chunks
    wire_bytes: int = 0  # payload bytes as they came over the wire (compressed)
    verify_failures: int = 0


class RemoteSource:
    """Chunks of the resources served at ``raddr`` (HOST:PORT).

    ``token`` is the shared secret (never sent; see docs/wire.md), ``tls_ca`` a PEM
    file with the CA or self-signed certificate to trust; with it the connection uses
    TLS and the certificate must name the host of ``raddr`` (or ``tls_server_name``).
    ``compress`` is "auto" (zstd unless the server is on this host with a round trip
    under 2 ms), "zstd"
    or "none". ``chunk_timeout`` bounds the handshake and how long requests may wait
    without any of them being answered before the connection counts as lost.
    """

    def __init__(
        self,
        raddr: str,
        token: str | None = None,
        tls_ca: str | None = None,
        retry_timeout: float = 30.0,
        chunk_timeout: float = 30.0,
        tls_server_name: str | None = None,
        compress: str = "auto",
    ) -> None:
        host, self.port = wire.parse_addr(raddr, "remote address")
        self.host = host or "127.0.0.1"
        self.raddr = wire.format_addr(self.host, self.port)
        self.token = token or None
        if compress not in ("auto", "zstd", "none"):
            raise DrafterError(f"bad compression {compress!r}: auto, zstd or none")
        self.compress = compress
        self._ssl = security.client_ssl_context(tls_ca) if tls_ca else None
        self._server_name = tls_server_name or self.host
        self.retry_timeout = retry_timeout
        self.chunk_timeout = chunk_timeout
        self.manifest: dict[str, int] = {}
        self.hashes: dict[str, list[bytes]] = {}
        self.hot: dict[str, list[int]] = {}
        self.chunk_size = 0
        self.config = b""
        self.rtt = 0.0  # of the first handshake
        self.compressed = False  # whether this connection asked for compressed chunks
        self.stats = ClientStats()
        self.metrics: Metrics | None = None  # drafter.metrics: counts each chunk received
        self.reconnects = 0
        # Called after every reconnect (for example to tell a migration source that its
        # destination is back); runs on the client's loop.
        self.on_reconnect: Callable[[], None] | None = None
        self.window = INITIAL_WINDOW
        self._in_flight = 0  # bytes of background requests sent and not answered
        self._in_flight_requests = 0
        self._requests = 0  # requests of every priority sent (or about to be) and unanswered
        self._demand_waiters: deque[asyncio.Future[None]] = deque()
        self._other_waiters: deque[asyncio.Future[None]] = deque()
        self._window_waiters: deque[asyncio.Future[None]] = deque()
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self._pending: dict[int, _Pending] = {}
        self._calls: dict[int, asyncio.Future[bytes]] = {}
        self._parts: dict[int, list[bytes]] = {}  # a call's answer so far (PART frames)
        self._limits: dict[int, int] = {}  # the most a call's answer may hold
        self._next_id = 1
        self._conn: _Conn | None = None
        self._failed: DrafterError | None = None
        self._closed = False
        self._reconnecting: asyncio.Task[None] | None = None
        self._lost_since: float | None = None
        self._lost_reason = ""
        self._dctx = zstandard.ZstdDecompressor()

    @property
    def failed(self) -> bool:
        """Whether the connection is lost for good (every fetch and call fails)."""
        return self._failed is not None or self._closed

    @property
    def zero_chunks(self) -> int:
        """Chunks that arrived as the all-zero marker (no payload)."""
        return self.stats.zero_chunks

    # --- public ------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and authenticate; fill ``manifest``, ``hashes``, ``hot``, ``config``.

        Fails at once with a DrafterError (no retry) if the server cannot be reached,
        refuses the token or speaks another protocol version.
        """
        if self._conn is not None:
            return
        try:
            conn, greeting = await self._open()
        except _Transient as e:
            raise DrafterError(f"cannot connect to {self.raddr}: {e}") from None
        welcome = greeting.welcome
        self.chunk_size = welcome.chunk_size
        self.manifest = dict(welcome.manifest)
        self.config = welcome.config
        self.hashes = greeting.hashes
        self.hot = greeting.hot
        self.rtt = greeting.rtt
        self._names = list(welcome.manifest)
        self._index = {name: i for i, name in enumerate(self._names)}
        self._failed = None
        self._closed = False
        self._start(conn)

    def chunks(self, resource: str) -> int:
        """How many chunks ``resource`` has."""
        return wire.chunk_count(self.manifest[resource], self.chunk_size)

    async def fetch(
        self, resource: str, index: int, priority: Priority | int = Priority.BACKGROUND
    ) -> ChunkData:
        """Chunk ``index`` of ``resource``, verified against the manifest's hash."""
        expected = self.hashes.get(resource)
        want = expected[index] if expected is not None and 0 <= index < len(expected) else None
        data, _ = await self.fetch_chunk(resource, index, priority, want)
        return data

    async def fetch_chunk(
        self,
        resource: str,
        index: int,
        priority: Priority | int = Priority.BACKGROUND,
        expected: bytes | None = None,
    ) -> tuple[ChunkData, bytes]:
        """``(bytes, hash)`` of chunk ``index``: ``chunk_size`` bytes, fewer only at the
        end. The bytes match the hash, and the hash is ``expected`` when one is given;
        otherwise VerificationError. Waits through reconnects; DrafterError once the
        connection is lost for good (or the server refuses the request)."""
        r, _ = self._check(resource, index, 1)
        if expected == wire.ZERO_HASH:
            self.stats.zero_chunks += 1
            return bytes(self._chunk_length(r, index)), wire.ZERO_HASH
        got: list[tuple[ChunkData, bytes]] = []
        await self.fetch_run(
            resource,
            index,
            1,
            priority,
            [expected],
            lambda _i, data, h: got.append((bytes(data), h)),
        )
        return got[0]

    async def fetch_run(
        self,
        resource: str,
        start: int,
        count: int,
        priority: Priority | int,
        expected: list[bytes | None],
        deliver: Deliver,
    ) -> None:
        """Chunks ``start`` to ``start + count - 1`` with one request: each is verified
        (as in :meth:`fetch_chunk`, against ``expected[i]``) and handed to ``deliver``
        as it arrives, in order. ``deliver`` must not keep the bytes it is given after
        it returns (they are a view into a buffer that is reused): copy them to keep
        them. Background runs wait for room in the window."""
        r, _ = self._check(resource, start, count)
        if len(expected) != count:
            raise ValueError("one expected hash per chunk")
        loop = asyncio.get_running_loop()
        pending = _Pending(r, start, count, int(priority), deque(expected), deliver,
                           loop.create_future())  # fmt: skip
        if priority == Priority.BACKGROUND:
            size = sum(self._chunk_length(r, i) for i in range(start, start + count))
            await self._admit(pending, size)
        try:
            await self._take_slot(priority == Priority.DEMAND)
        except BaseException:
            self._release(pending, pending.windowed)
            raise
        if self._failed is not None or self._closed:  # while it waited for room
            self._release(pending, pending.windowed)
            self._give_slot()
            self._check(resource, start, count)  # raises
        request_id = self._next_id
        self._next_id = request_id % 0xFFFFFFFF + 1
        conn = self._conn
        if conn is not None and not self._pending:
            conn.last_progress = loop.time()
        self._pending[request_id] = pending
        try:
            if conn is not None:
                self._send(conn, request_id, pending)
            await pending.future
        finally:
            self._pending.pop(request_id, None)
            self._release(pending, pending.windowed)
            self._give_slot()

    def _check(self, resource: str, start: int, count: int) -> tuple[int, int]:
        if self._failed is not None:
            raise DrafterError(str(self._failed))
        if self._closed or not self.chunk_size:
            raise DrafterError(f"the connection to {self.raddr} is not open")
        r = self._index.get(resource)
        if r is None:
            raise DrafterError(f"{self.raddr} does not offer a resource named {resource!r}")
        total = self.manifest[resource]
        if start < 0 or (start + count - 1) * self.chunk_size >= total:
            raise DrafterError(
                f"chunk {start + count - 1} is beyond the end of {resource} ({total} bytes)"
            )
        if not 1 <= count <= wire.MAX_RUN:
            raise DrafterError(f"a run of {count} chunks (at most {wire.MAX_RUN})")
        return r, total

    def _chunk_length(self, r: int, index: int) -> int:
        return min(self.chunk_size, self.manifest[self._names[r]] - index * self.chunk_size)

    async def call(
        self,
        kind: MsgType,
        body: bytes = b"",
        timeout: float = 60.0,
        max_answer: int = wire.MAX_BODY,
    ) -> bytes:
        """A control call (dirty lists, migration): send it, return the answer's body.
        ``max_answer`` bytes at most (above one frame: in PART frames); more is a
        protocol error.

        Not retried across reconnects: the call fails if the connection drops.
        """
        if self._failed is not None:
            raise DrafterError(str(self._failed))
        conn = self._conn
        if conn is None or conn.dead:
            raise DrafterError(f"not connected to {self.raddr}")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        request_id = self._next_id
        self._next_id = request_id % 0xFFFFFFFF + 1
        self._calls[request_id] = future
        self._limits[request_id] = min(max_answer, wire.MAX_ANSWER)
        conn.channel.write(kind, body, request_id)
        conn.last_sent = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise DrafterError(
                f"{self.raddr} did not answer {kind.name} in {timeout:g} s"
            ) from None
        finally:
            self._calls.pop(request_id, None)
            self._parts.pop(request_id, None)
            self._limits.pop(request_id, None)

    def _check_answer(self, request_id: int, parts: list[Any]) -> None:
        limit = self._limits.get(request_id, wire.MAX_BODY)
        if sum(len(part) for part in parts) > limit:
            raise ProtocolError(ErrorCode.PROTOCOL, f"an answer beyond its {limit} bytes")

    async def close(self) -> None:
        """Drop the connection; pending fetches fail."""
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            self._reconnecting = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.dead = True
            for task in conn.tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await conn.channel.close(1.0)
            conn.channel.abort()
        self._fail_pending(DrafterError(f"the connection to {self.raddr} was closed"))

    # --- the window ----------------------------------------------------------------

    async def _admit(self, pending: _Pending, size: int) -> None:
        """Wait until a background request fits in the window of bytes in flight."""
        while self._in_flight and (
            self._in_flight + size > self.window
            or self._in_flight_requests >= _MAX_BACKGROUND_REQUESTS
        ):
            waiter = asyncio.get_running_loop().create_future()
            self._window_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                self._wake_window()  # pass the turn on
                raise
        self._in_flight += size
        self._in_flight_requests += 1
        pending.windowed = size

    async def _take_slot(self, demand: bool) -> None:
        """Wait until one more request keeps every priority's total under the cap."""
        cap, waiters = (
            (_MAX_REQUESTS, self._demand_waiters)
            if demand
            else (_MAX_QUEUED_REQUESTS, self._other_waiters)
        )
        while self._requests >= cap:
            waiter = asyncio.get_running_loop().create_future()
            waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                self._give_slot(taken=False)  # pass the turn on
                raise
        self._requests += 1

    def _give_slot(self, taken: bool = True) -> None:
        if taken:
            self._requests -= 1
        for cap, waiters in (
            (_MAX_REQUESTS, self._demand_waiters),
            (_MAX_QUEUED_REQUESTS, self._other_waiters),
        ):
            while waiters and self._requests < cap:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    break

    def _release(self, pending: _Pending, size: int) -> None:
        """``size`` bytes of a background request arrived (or will not)."""
        if not pending.windowed or not size:
            return
        pending.windowed -= size
        self._in_flight -= size
        if not pending.windowed:
            self._in_flight_requests -= 1
        # Refill in bursts (an eighth of the window at a time): the requests of a burst
        # leave in one send instead of one each.
        if self.window - self._in_flight >= self.window // 8 or not self._in_flight:
            self._wake_window(all_of_them=True)

    def _wake_window(self, all_of_them: bool = False) -> None:
        while self._window_waiters:
            waiter = self._window_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not all_of_them:
                    return

    # --- connection --------------------------------------------------------------

    async def _open(self) -> tuple[_Conn, _Greeting]:
        """A new authenticated connection; _Transient or DrafterError (fatal)."""
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(
                    FrameProtocol,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self._server_name if self._ssl else None,
                ),
                self.chunk_timeout,
            )
        except ssl.SSLCertVerificationError as e:
            raise DrafterError(
                f"{self.raddr}: TLS certificate check failed: {e.verify_message}"
            ) from None
        except ssl.SSLError as e:
            raise _Transient(f"TLS handshake failed: {e.reason or e}") from None
        except TimeoutError:
            raise _Transient("timed out") from None
        except OSError as e:
            raise _Transient(e.strerror or str(e)) from None
        assert isinstance(transport, asyncio.Transport)
        channel = Channel(transport, protocol)
        try:
            return await asyncio.wait_for(self._handshake(channel), self.chunk_timeout)
        except BaseException as e:
            channel.abort()
            if isinstance(e, TimeoutError):
                raise _Transient("no answer to the hello") from None
            if isinstance(e, asyncio.IncompleteReadError):
                hint = "" if self._ssl else " (does it require TLS?)"
                raise _Transient(
                    f"the server closed the connection during the handshake{hint}"
                ) from None
            if isinstance(e, ProtocolError):
                raise DrafterError(
                    f"{self.raddr} does not speak this protocol: {e.message}"
                ) from None
            if isinstance(e, OSError):
                raise _Transient(e.strerror or str(e)) from None
            raise

    async def _handshake(self, channel: Channel) -> tuple[_Conn, _Greeting]:
        loop = asyncio.get_running_loop()
        flags = wire.HELLO_ZSTD | wire.HELLO_PARTS | (wire.HELLO_TOKEN if self.token else 0)
        client_hello = wire.Hello(wire.VERSION, flags, security.new_nonce()).body()
        sent = loop.time()
        channel.write(MsgType.CLIENT_HELLO, client_hello)
        kind, _, body = await channel.read()
        rtt = loop.time() - sent
        server_hello = bytes(body)
        self._check_refusal(kind, server_hello)
        if kind != MsgType.SERVER_HELLO:
            raise ProtocolError(ErrorCode.PROTOCOL, f"expected a server hello, got type {kind}")
        try:
            hello = wire.Hello.decode(server_hello, "server")
        except ProtocolError as e:
            if e.code == ErrorCode.VERSION:
                raise DrafterError(f"{self.raddr}: {e.message}") from None
            raise
        if self.token is not None and not hello.flags & wire.HELLO_TOKEN:
            raise DrafterError(
                f"{self.raddr} does not ask for a token, but one was given: "
                "refusing to trust a server that cannot prove it knows the token"
            )
        if self.token is None and hello.flags & wire.HELLO_TOKEN:
            raise DrafterError(f"{self.raddr} requires a token: {security.no_token_hint()}")
        peername = channel.transport.get_extra_info("peername")
        same_host = bool(peername) and wire.is_loopback(str(peername[0]))
        # "auto": compress unless the server is on this host over a fast path (there the
        # CPU, not the link, is the limit); a long round trip means a slow path even
        # when it goes through this host (a tunnel, or the benchmark's link emulator).
        want_zstd = self.compress == "zstd" or (
            self.compress == "auto" and (not same_host or rtt >= COMPRESS_RTT)
        )
        choice_flags = wire.HELLO_ZSTD if want_zstd and hello.flags & wire.HELLO_ZSTD else 0
        choice = choice_flags.to_bytes(2, "big")
        proof = bytes(wire.PROOF_SIZE)
        if self.token is not None:
            proof = security.client_proof(self.token, client_hello, server_hello + choice)
        channel.write(MsgType.AUTH, proof + choice)
        send = recv = None
        if self.token is not None and self._ssl is None:
            send, recv = security.seals(self.token, client_hello, server_hello)
        channel.seal(send, recv)
        # A server that refuses our proof answers with an ERROR frame it cannot seal.
        channel.protocol.untagged_error = recv is not None
        try:
            kind, _, body = await channel.read()
        except ProtocolError:
            # A WELCOME sealed with another key: the server does not know our token.
            raise DrafterError(f"{self.raddr} refused the connection (wrong token?)") from None
        self._check_refusal(kind, body)  # a server with another token says so here
        if kind != MsgType.WELCOME:
            raise ProtocolError(ErrorCode.PROTOCOL, f"expected a welcome, got type {kind}")
        welcome = wire.Welcome.decode(bytes(body))
        if self.token is not None:
            expected = security.server_proof(self.token, client_hello, server_hello + choice)
            if not security.proof_matches(welcome.proof, expected):
                raise DrafterError(f"{self.raddr} failed to prove it knows the token")
        names = list(welcome.manifest)
        counts = [wire.chunk_count(s, welcome.chunk_size) for s in welcome.manifest.values()]
        hashes: dict[str, list[bytes]] = {}
        for r, name in enumerate(names):
            got: list[bytes] = []
            while len(got) < counts[r] or (counts[r] == 0 and name not in hashes):
                kind, _, body = await channel.read()
                self._check_refusal(kind, body)
                if kind != MsgType.HASHES:
                    raise ProtocolError(ErrorCode.PROTOCOL, f"expected hashes, got type {kind}")
                part = wire.Hashes.decode(bytes(body))
                n = len(part.hashes) // wire.HASH_SIZE
                if part.resource != r or part.start != len(got) or len(got) + n > counts[r]:
                    raise ProtocolError(ErrorCode.PROTOCOL, "hash list out of order")
                got.extend(part.hashes[i : i + wire.HASH_SIZE] for i in range(0, n * 32, 32))
                hashes[name] = got
            hashes[name] = got
        kind, _, body = await channel.read()
        self._check_refusal(kind, body)
        if kind != MsgType.HOT:
            raise ProtocolError(ErrorCode.PROTOCOL, f"expected the hot list, got type {kind}")
        hot = {names[r]: indices for r, indices in wire.decode_hot(bytes(body), counts).items()}
        self.compressed = bool(choice_flags)
        greeting = _Greeting(welcome, hashes, hot, rtt)
        return _Conn(channel), greeting

    def _check_refusal(self, kind: int, body: wire.Buffer) -> None:
        if kind != MsgType.ERROR:
            return
        code, message = wire.decode_error(body)
        if code in (ErrorCode.INTERNAL, ErrorCode.SHUTTING_DOWN, ErrorCode.TIMEOUT):
            raise _Transient(f"the server said: {message}")
        hint = ""
        if code == ErrorCode.AUTH:
            hint = " (set DRAFTER_TOKEN or give the right --token-file)"
        raise DrafterError(f"{self.raddr} refused the connection: {message}{hint}")

    def _start(self, conn: _Conn) -> None:
        """Adopt a fresh connection: start its tasks, send what is still unanswered."""
        loop = asyncio.get_running_loop()
        conn.last_progress = conn.last_sent = loop.time()
        self._conn = conn
        conn.tasks = [
            asyncio.create_task(self._receive(conn)),
            asyncio.create_task(self._watch(conn)),
        ]
        waiting = sorted(self._pending.items(), key=lambda kv: kv[1].priority)
        for request_id, pending in waiting:
            if not pending.future.done():
                self._send(conn, request_id, pending)

    def _send(self, conn: _Conn, request_id: int, pending: _Pending) -> None:
        if conn.dead or conn.channel.is_closing():
            return  # the receiver notices the loss; the request is sent again after it
        request = wire.Request(pending.priority, pending.resource, pending.index, pending.count)
        conn.channel.write(MsgType.REQUEST, request.body(), request_id)
        conn.last_sent = asyncio.get_running_loop().time()
        pending.sent = pending.sent or conn.last_sent

    def _chunk_data(self, head: ChunkHead, payload: memoryview, p: _Pending) -> ChunkData:
        """The bytes of the next chunk of ``p`` from a CHUNK frame, verified."""
        name = self._names[p.resource]
        size = self._chunk_length(p.resource, p.index)
        if (head.resource, head.index, head.length) != (p.resource, p.index, size):
            raise ProtocolError(
                ErrorCode.PROTOCOL, f"answer for another chunk than {name} {p.index}"
            )
        if head.flags & wire.CHUNK_ZERO:
            if payload or head.hash != wire.ZERO_HASH:
                raise ProtocolError(ErrorCode.PROTOCOL, "malformed zero marker")
            data: ChunkData = bytes(size)
            self.stats.zero_chunks += 1
        else:
            if head.flags & wire.CHUNK_ZSTD:
                try:
                    if zstandard.frame_content_size(payload) != size:
                        raise ProtocolError(ErrorCode.PROTOCOL, "compressed chunk of wrong size")
                    data = self._dctx.decompress(payload)
                except zstandard.ZstdError:
                    raise ProtocolError(ErrorCode.PROTOCOL, "malformed compressed chunk") from None
            else:
                data = payload
            if len(data) != size:
                raise ProtocolError(
                    ErrorCode.PROTOCOL,
                    f"chunk {p.index} of {name} has {len(data)} bytes, not {size}",
                )
            if digest(data) != head.hash:
                self.stats.verify_failures += 1
                raise VerificationError(
                    f"chunk {p.index} of {name} from {self.raddr} failed verification "
                    "(its bytes do not match their hash): refused it"
                )
            self.stats.chunks += 1
            self.stats.bytes += size
            self.stats.wire_bytes += len(payload)
        expected = p.expected[0]
        if expected is not None and head.hash != expected:
            self.stats.verify_failures += 1
            raise VerificationError(
                f"chunk {p.index} of {name} from {self.raddr} does not match the hash "
                "the manifest gave for it: refused it"
            )
        return data

    async def _receive(self, conn: _Conn) -> None:
        """Read answers and hand them to the waiting fetches."""
        loop = asyncio.get_running_loop()
        pending = self._pending
        try:
            while True:
                kind, request_id, body = await conn.channel.read()
                if kind == MsgType.CHUNK:
                    head = ChunkHead.decode(body)
                    p = pending.get(request_id)
                    if p is None or p.future.done():
                        continue  # a fetch that was cancelled meanwhile: no progress
                    data = self._chunk_data(head, memoryview(body)[wire.CHUNK_FIXED :], p)
                    size = len(data)
                    p.index += 1
                    p.count -= 1
                    p.expected.popleft()
                    conn.last_progress = loop.time()
                    self._lost_since = None
                    if self.metrics is not None:  # payload 0 bytes: the zero marker
                        received = len(body) - wire.CHUNK_FIXED
                        latency = conn.last_progress - p.sent
                        self.metrics.chunk_pulled(self._names[p.resource], p.priority, size,
                                                  received, latency)  # fmt: skip
                    if p.windowed:
                        self._release(p, size)
                        if self.window < MAX_WINDOW:
                            self.window = min(MAX_WINDOW, self.window + size)  # slow start
                    try:
                        p.deliver(head.index, data, head.hash)
                    except Exception as e:  # the receiver's problem: fail its request only
                        p.future.set_exception(e)
                        continue
                    finally:
                        del data
                        if isinstance(body, bytearray):
                            conn.channel.protocol.recycle(body)
                    if not p.count:
                        p.future.set_result(None)
                elif kind == MsgType.PART:
                    call = self._calls.get(request_id)
                    if call is None or call.done():
                        continue  # an abandoned call's: dropped, never kept
                    parts = self._parts.setdefault(request_id, [])
                    parts.append(bytes(body))
                    self._check_answer(request_id, parts)
                    conn.last_progress = loop.time()
                elif wire.is_control(kind):
                    call = self._calls.get(request_id)
                    parts = self._parts.pop(request_id, [])
                    if parts:
                        self._check_answer(request_id, [*parts, body])
                    if call is not None and not call.done():
                        call.set_result(b"".join([*parts, body]))
                        conn.last_progress = loop.time()
                elif kind == MsgType.ERROR:
                    code, message = wire.decode_error(body)
                    if code in (ErrorCode.INTERNAL, ErrorCode.SHUTTING_DOWN, ErrorCode.TIMEOUT):
                        raise _Transient(f"the server said: {message}")
                    raise DrafterError(f"{self.raddr} reported an error: {message}")
                else:
                    raise ProtocolError(ErrorCode.PROTOCOL, f"unexpected frame type {kind}")
        except asyncio.IncompleteReadError:
            self._lost(conn, "the server closed the connection")
        except _Transient as e:
            self._lost(conn, str(e))
        except ProtocolError as e:
            with contextlib.suppress(Exception):
                conn.channel.write(MsgType.ERROR, wire.error_body(e.code, e.message))
            self._fail(DrafterError(f"{self.raddr} broke the protocol: {e.message}"))
        except DrafterError as e:
            self._fail(e)
        except OSError as e:
            self._lost(conn, e.strerror or str(e) or type(e).__name__)

    async def _watch(self, conn: _Conn) -> None:
        """Count a connection as lost when none of our requests is answered in
        ``chunk_timeout``; ping the server when there is nothing else to say."""
        loop = asyncio.get_running_loop()
        period = max(0.05, min(1.0, self.chunk_timeout / 4))
        while not conn.dead:
            await asyncio.sleep(period)
            now = loop.time()
            # Fetches only: a control call has its own timeout (a switch-over may take a
            # while, and nothing else need be outstanding meanwhile).
            if self._pending and now - conn.last_progress > self.chunk_timeout:
                self._lost(conn, f"no answer for {self.chunk_timeout:g} s")
                return
            if now - conn.last_sent > PING_INTERVAL and not conn.dead:
                request_id = self._next_id
                self._next_id = request_id % 0xFFFFFFFF + 1
                conn.channel.write(MsgType.PING, b"", request_id)
                conn.last_sent = now

    def _drop(self, conn: _Conn) -> None:
        conn.dead = True
        for call in self._calls.values():  # control calls die with their connection
            if not call.done():
                call.set_exception(DrafterError(f"lost the connection to {self.raddr}"))
        if self._conn is conn:
            self._conn = None
        me = asyncio.current_task()
        for task in conn.tasks:
            if task is not me:
                task.cancel()
        conn.channel.abort()

    def _lost(self, conn: _Conn, reason: str) -> None:
        if conn.dead:
            return
        self._drop(conn)
        if self._closed or self._failed is not None:
            return
        if self._lost_since is None:
            self._lost_since = asyncio.get_running_loop().time()
            self._lost_reason = reason
        log.warning("lost the connection to %s (%s); reconnecting", self.raddr, reason)
        self._reconnecting = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._lost_since is not None
        deadline = self._lost_since + self.retry_timeout
        delay = _BACKOFF_START
        last = self._lost_reason
        while (remaining := deadline - loop.time()) > 0:
            try:
                conn, greeting = await asyncio.wait_for(self._open(), remaining)
            except DrafterError as e:
                self._fail(e)
                return
            except (_Transient, TimeoutError) as e:
                last = str(e) or "timed out"
            else:
                w = greeting.welcome
                if (w.chunk_size, w.manifest, w.config) != (
                    self.chunk_size,
                    self.manifest,
                    self.config,
                ):
                    conn.channel.abort()
                    self._fail(DrafterError(f"{self.raddr} now serves different resources"))
                    return
                self.reconnects += 1
                self._reconnecting = None
                if not self._pending:
                    self._lost_since = None
                log.info("reconnected to %s", self.raddr)
                self._start(conn)
                if self.on_reconnect is not None:
                    self.on_reconnect()
                return
            await asyncio.sleep(max(0.0, min(delay, deadline - loop.time())))
            delay = min(delay * 2, _BACKOFF_MAX)
        self._reconnecting = None
        self._fail(
            DrafterError(
                f"lost the connection to {self.raddr}: {self._lost_reason} "
                f"(could not reconnect within {self.retry_timeout:g} s: {last})"
            )
        )

    def _fail(self, error: DrafterError) -> None:
        """Give up for good: every pending and future fetch raises ``error``."""
        if self._failed is None:
            log.error("%s", error)
        self._failed = error
        for call in self._calls.values():
            if not call.done():
                call.set_exception(DrafterError(str(error)))
        if self._conn is not None:
            self._drop(self._conn)
        task, self._reconnecting = self._reconnecting, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._fail_pending(error)

    def _fail_pending(self, error: DrafterError) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(
                    type(error)(str(error)) if isinstance(error, VerificationError)
                    else DrafterError(str(error))
                )  # fmt: skip
