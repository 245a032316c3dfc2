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
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zstandard

from drafter.chunks import ChunkData, Deliver, chunk_length
from drafter.errors import DrafterError
from drafter.transport import protocol as wire
from drafter.transport import security
from drafter.transport.channel import Channel
from drafter.transport.handshake import Dial, Greeting, Transient
from drafter.transport.inflight import ClientStats, Pending, VerificationError, Window
from drafter.transport.protocol import (
    ChunkHead,
    ErrorCode,
    MsgType,
    Priority,
    ProtocolError,
    RemoteError,
    code_is_transient,
)

if TYPE_CHECKING:
    from drafter.metrics import Metrics

__all__ = ["ChunkData", "Priority", "RemoteError", "RemoteSource", "VerificationError"]

log = logging.getLogger(__name__)

_BACKOFF_START = 0.05
_BACKOFF_MAX = 2.0
PING_INTERVAL = 30.0


def _again(error: DrafterError) -> DrafterError:
    """A fresh exception like ``error`` (its class and wire code kept), to raise in one
    more place without chaining the tracebacks of the others."""
    if isinstance(error, RemoteError):
        return RemoteError(error.code, str(error))
    if isinstance(error, VerificationError):
        return VerificationError(str(error))
    return DrafterError(str(error))


@dataclass(eq=False)
class _Conn:
    channel: Channel
    last_progress: float = 0.0
    last_sent: float = 0.0
    dead: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class RemoteSource:
    """Chunks of the resources served at ``raddr`` (HOST:PORT).

    ``token`` is the shared secret (never sent; see docs/wire.md; DrafterError unless
    ``drafter-token`` made it), ``tls_ca`` a PEM
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
        self.token = security.check_token(token, f"the client of {self.raddr}") if token else None
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
        # Called after every reconnect (for example to tell a migration source that its
        # destination is back); runs on the client's loop.
        self.on_reconnect: Callable[[], None] | None = None
        self._window = Window()
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self._pending: dict[int, Pending] = {}
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
    def window(self) -> int:
        """Bytes of background requests that may be in flight now."""
        return self._window.size

    @property
    def reconnects(self) -> int:
        """Times a lost connection was re-established."""
        return self.stats.reconnects

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
        except Transient as e:
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
        expected: Sequence[bytes | None],
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
        pending = Pending(r, start, count, int(priority), deque(expected), deliver,
                           loop.create_future())  # fmt: skip
        if priority == Priority.BACKGROUND:
            size = sum(self._chunk_length(r, i) for i in range(start, start + count))
            await self._window.admit(pending, size)
        try:
            await self._window.take_slot(priority == Priority.DEMAND)
        except BaseException:
            self._window.release(pending, pending.windowed)
            raise
        if self._failed is not None or self._closed:  # while it waited for room
            self._window.release(pending, pending.windowed)
            self._window.give_slot()
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
            self._window.release(pending, pending.windowed)
            self._window.give_slot()

    def _check(self, resource: str, start: int, count: int) -> tuple[int, int]:
        if self._failed is not None:
            raise _again(self._failed)
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
        return chunk_length(self.manifest[self._names[r]], self.chunk_size, index)

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
            raise _again(self._failed)
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

    # --- connection --------------------------------------------------------------

    async def _open(self) -> tuple[_Conn, Greeting]:
        """A new authenticated connection; Transient or DrafterError (fatal)."""
        dial = Dial(self.raddr, self.host, self.port, self.token, self._ssl, self._server_name,
                    self.compress, self.chunk_timeout)  # fmt: skip
        channel, greeting = await dial.open()
        self.compressed = greeting.compressed
        return _Conn(channel), greeting

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

    def _send(self, conn: _Conn, request_id: int, pending: Pending) -> None:
        if conn.dead or conn.channel.is_closing():
            return  # the receiver notices the loss; the request is sent again after it
        request = wire.Request(pending.priority, pending.resource, pending.index, pending.count)
        conn.channel.write(MsgType.REQUEST, request.body(), request_id)
        conn.last_sent = asyncio.get_running_loop().time()
        pending.sent = pending.sent or conn.last_sent

    def _chunk_data(self, head: ChunkHead, payload: memoryview, p: Pending) -> ChunkData:
        """The bytes of the next chunk of ``p`` from a CHUNK frame, verified."""
        size = self._chunk_length(p.resource, p.index)
        name = self._names[p.resource]
        return p.verify(head, payload, size, f"{name} from {self.raddr}", self._dctx, self.stats)

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
                        self._window.release(p, size)
                        self._window.grow(size)
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
                    if code_is_transient(code):
                        raise Transient(f"the server said: {message}")
                    raise RemoteError(code, f"{self.raddr} reported an error: {message}")
                else:
                    raise ProtocolError(ErrorCode.PROTOCOL, f"unexpected frame type {kind}")
        except asyncio.IncompleteReadError:
            self._lost(conn, "the server closed the connection")
        except Transient as e:
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
            except (Transient, TimeoutError) as e:
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
                self.stats.reconnects += 1
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
                call.set_exception(_again(error))
        if self._conn is not None:
            self._drop(self._conn)
        task, self._reconnecting = self._reconnecting, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._fail_pending(error)

    def _fail_pending(self, error: DrafterError) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(_again(error))
