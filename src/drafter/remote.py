"""The client side of the wire protocol: chunks of a remote VM's resources.

One :class:`RemoteSource` keeps one connection to a registry or peer and multiplexes
any number of concurrent :meth:`RemoteSource.fetch` calls over it by request id. A
dropped connection is re-established with exponential backoff for at most
``retry_timeout`` seconds while fetches wait; requests still unanswered are sent
again. A chunk is only ever returned whole: its full payload (or the zero marker) of
exactly the expected length arrived in one frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass, field

from drafter import wire
from drafter.errors import DrafterError
from drafter.wire import ErrorCode, MsgType, Priority, ProtocolError

__all__ = ["Priority", "RemoteSource"]

log = logging.getLogger(__name__)

_BACKOFF_START = 0.05
_BACKOFF_MAX = 2.0


class _Transient(Exception):
    """A connection problem that reconnecting may cure."""


@dataclass(eq=False)
class _Pending:
    resource: int
    index: int
    priority: int
    size: int
    future: asyncio.Future[bytes]


@dataclass(eq=False)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    last_progress: float = 0.0
    dead: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class RemoteSource:
    """Chunks of the resources served at ``raddr`` (HOST:PORT).

    ``token`` is the shared secret (never sent; see docs/wire.md), ``tls_ca`` a PEM
    file with the CA or self-signed certificate to trust; with it the connection uses
    TLS and the certificate must name the host of ``raddr`` (or ``tls_server_name``).
    ``chunk_timeout`` bounds the handshake and how long the connection may stay silent
    while requests are outstanding before it counts as lost.
    """

    def __init__(
        self,
        raddr: str,
        token: str | None = None,
        tls_ca: str | None = None,
        retry_timeout: float = 30.0,
        chunk_timeout: float = 30.0,
        tls_server_name: str | None = None,
    ) -> None:
        host, self.port = wire.parse_addr(raddr, "remote address")
        self.host = host or "127.0.0.1"
        self.raddr = wire.format_addr(self.host, self.port)
        self.token = token or None
        self._ssl = wire.client_ssl_context(tls_ca) if tls_ca else None
        self._server_name = tls_server_name or self.host
        self.retry_timeout = retry_timeout
        self.chunk_timeout = chunk_timeout
        self.manifest: dict[str, int] = {}
        self.chunk_size = 0
        self.config = b""
        self.zero_chunks = 0  # chunks that arrived as the zero marker
        self.reconnects = 0
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self._pending: dict[int, _Pending] = {}
        self._calls: dict[int, asyncio.Future[bytes]] = {}
        self._next_id = 1
        self._conn: _Conn | None = None
        self._failed: DrafterError | None = None
        self._closed = False
        self._reconnecting: asyncio.Task[None] | None = None
        self._lost_since: float | None = None
        self._lost_reason = ""

    # --- public ------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and authenticate; fill ``manifest``, ``chunk_size`` and ``config``.

        Fails at once with a DrafterError (no retry) if the server cannot be reached,
        refuses the token or speaks another protocol version.
        """
        if self._conn is not None:
            return
        try:
            conn, welcome = await self._open()
        except _Transient as e:
            raise DrafterError(f"cannot connect to {self.raddr}: {e}") from None
        self.chunk_size = welcome.chunk_size
        self.manifest = dict(welcome.manifest)
        self.config = welcome.config
        self._names = list(welcome.manifest)
        self._index = {name: i for i, name in enumerate(self._names)}
        self._failed = None
        self._closed = False
        self._start(conn)

    async def fetch(
        self, resource: str, index: int, priority: Priority | int = Priority.BACKGROUND
    ) -> bytes:
        """Chunk ``index`` of ``resource``: ``chunk_size`` bytes, fewer only at its end.

        Waits through reconnects; raises DrafterError once the connection is lost for
        good (or the server refuses the request).
        """
        if self._failed is not None:
            raise DrafterError(str(self._failed))
        if self._closed or not self.chunk_size:
            raise DrafterError(f"the connection to {self.raddr} is not open")
        r = self._index.get(resource)
        if r is None:
            raise DrafterError(f"{self.raddr} does not offer a resource named {resource!r}")
        total = self.manifest[resource]
        start = index * self.chunk_size
        if index < 0 or start >= total:
            raise DrafterError(f"chunk {index} is beyond the end of {resource} ({total} bytes)")
        loop = asyncio.get_running_loop()
        pending = _Pending(r, index, int(priority), min(self.chunk_size, total - start),
                           loop.create_future())  # fmt: skip
        request_id = self._next_id
        self._next_id = request_id % 0xFFFFFFFF + 1
        conn = self._conn
        if conn is not None and not self._pending:
            conn.last_progress = loop.time()
        self._pending[request_id] = pending
        if conn is not None:
            self._send(conn, request_id, pending)
        try:
            return await pending.future
        finally:
            self._pending.pop(request_id, None)

    async def call(self, kind: MsgType, body: bytes = b"", timeout: float = 60.0) -> bytes:
        """A control call (dirty lists, migration): send it, return the answer's body.

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
        conn.writer.write(wire.frame(kind, body, request_id))
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise DrafterError(
                f"{self.raddr} did not answer {kind.name} in {timeout:g} s"
            ) from None
        finally:
            self._calls.pop(request_id, None)

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
                conn.writer.close()
                async with asyncio.timeout(1):
                    await conn.writer.wait_closed()
            conn.writer.transport.abort()
        self._fail_pending(DrafterError(f"the connection to {self.raddr} was closed"))

    # --- connection --------------------------------------------------------------

    async def _open(self) -> tuple[_Conn, wire.Welcome]:
        """A new authenticated connection; _Transient or DrafterError (fatal)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self._server_name if self._ssl else None,
                    limit=wire.MAX_BODY + wire.HEADER_SIZE,
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
        try:
            welcome = await asyncio.wait_for(self._handshake(reader, writer), self.chunk_timeout)
        except TimeoutError:
            writer.transport.abort()
            raise _Transient("no answer to the hello") from None
        except asyncio.IncompleteReadError:
            writer.transport.abort()
            hint = "" if self._ssl else " (does it require TLS?)"
            raise _Transient(
                f"the server closed the connection during the handshake{hint}"
            ) from None
        except ProtocolError as e:
            writer.transport.abort()
            raise DrafterError(f"{self.raddr} does not speak this protocol: {e.message}") from None
        except OSError as e:
            writer.transport.abort()
            raise _Transient(e.strerror or str(e)) from None
        except BaseException:
            writer.transport.abort()
            raise
        return _Conn(reader, writer), welcome

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> wire.Welcome:
        nonce = wire.new_nonce()
        writer.write(wire.ClientHello(wire.VERSION, nonce).encode())
        kind, _, body = await wire.read_frame(reader, max_body=4096)
        self._check_refusal(kind, body)
        if kind != MsgType.SERVER_HELLO:
            raise ProtocolError(ErrorCode.PROTOCOL, f"expected a server hello, got type {kind}")
        hello = wire.ServerHello.decode(body)
        if hello.version != wire.VERSION:
            message = f"protocol version {hello.version} is not supported"
            writer.write(wire.error_frame(ErrorCode.VERSION, message))
            raise DrafterError(
                f"{self.raddr} speaks protocol version {hello.version}, "
                f"this client speaks version {wire.VERSION}"
            )
        proof = b""
        if self.token is not None:
            if not hello.token_required:
                raise DrafterError(
                    f"{self.raddr} does not ask for a token, but one was given: "
                    "refusing to trust a server that cannot prove it knows the token"
                )
            proof = wire.client_proof(self.token, hello.nonce, nonce)
        writer.write(wire.frame(MsgType.AUTH, proof))
        kind, _, body = await wire.read_frame(reader)
        self._check_refusal(kind, body)  # a server with another token says so here
        if self.token is not None:
            expected = wire.server_proof(self.token, hello.nonce, nonce)
            if not wire.proof_matches(hello.proof, expected):
                raise DrafterError(f"{self.raddr} failed to prove it knows the token")
        if kind != MsgType.WELCOME:
            raise ProtocolError(ErrorCode.PROTOCOL, f"expected a welcome, got type {kind}")
        return wire.Welcome.decode(body)

    def _check_refusal(self, kind: int, body: bytes) -> None:
        if kind != MsgType.ERROR:
            return
        code, message = wire.decode_error(body)
        if code in (ErrorCode.INTERNAL, ErrorCode.SHUTTING_DOWN):
            raise _Transient(f"the server said: {message}")
        hint = ""
        if code == ErrorCode.AUTH:
            hint = " (set DRAFTER_TOKEN or give the right token)"
        raise DrafterError(f"{self.raddr} refused the connection: {message}{hint}")

    def _start(self, conn: _Conn) -> None:
        """Adopt a fresh connection: start its tasks, send what is still unanswered."""
        loop = asyncio.get_running_loop()
        conn.last_progress = loop.time()
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
        if conn.dead or conn.writer.is_closing():
            return  # the receiver notices the loss; the request is sent again after it
        request = wire.Request(pending.priority, pending.resource, pending.index)
        conn.writer.write(request.encode(request_id))

    async def _receive(self, conn: _Conn) -> None:
        """Read answers and hand them to the waiting fetches."""
        loop = asyncio.get_running_loop()
        reader = conn.reader
        pending = self._pending
        try:
            while True:
                kind, request_id, body = await wire.read_frame(reader)
                conn.last_progress = loop.time()
                if kind == MsgType.CHUNK:
                    p = pending.get(request_id)
                    if p is None or p.future.done():
                        continue  # a fetch that was cancelled meanwhile
                    if len(body) != p.size:
                        raise ProtocolError(
                            ErrorCode.PROTOCOL,
                            f"chunk {p.index} of {self._names[p.resource]} has {len(body)} "
                            f"bytes, not {p.size}",
                        )
                    p.future.set_result(body)
                    self._lost_since = None
                elif kind == MsgType.ZERO:
                    length = wire.decode_zero(body)
                    p = pending.get(request_id)
                    if p is None or p.future.done():
                        continue
                    if length != p.size:
                        raise ProtocolError(
                            ErrorCode.PROTOCOL, f"zero marker of {length} bytes, not {p.size}"
                        )
                    self.zero_chunks += 1
                    p.future.set_result(bytes(length))
                    self._lost_since = None
                elif wire.is_control(kind):
                    call = self._calls.get(request_id)
                    if call is not None and not call.done():
                        call.set_result(body)
                elif kind == MsgType.ERROR:
                    code, message = wire.decode_error(body)
                    if code in (ErrorCode.INTERNAL, ErrorCode.SHUTTING_DOWN):
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
                conn.writer.write(wire.error_frame(e.code, e.message))
            self._fail(DrafterError(f"{self.raddr} broke the protocol: {e.message}"))
        except DrafterError as e:
            self._fail(e)
        except OSError as e:
            self._lost(conn, e.strerror or str(e) or type(e).__name__)

    async def _watch(self, conn: _Conn) -> None:
        """Count a connection as lost when it stays silent while requests wait."""
        loop = asyncio.get_running_loop()
        period = max(0.05, min(1.0, self.chunk_timeout / 4))
        while not conn.dead:
            await asyncio.sleep(period)
            if self._pending and loop.time() - conn.last_progress > self.chunk_timeout:
                self._lost(conn, f"no answer for {self.chunk_timeout:g} s")
                return

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
        conn.writer.transport.abort()

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
                conn, welcome = await asyncio.wait_for(self._open(), remaining)
            except DrafterError as e:
                self._fail(e)
                return
            except (_Transient, TimeoutError) as e:
                last = str(e) or "timed out"
            else:
                if (welcome.chunk_size, welcome.manifest, welcome.config) != (
                    self.chunk_size,
                    self.manifest,
                    self.config,
                ):
                    conn.writer.transport.abort()
                    self._fail(DrafterError(f"{self.raddr} now serves different resources"))
                    return
                self.reconnects += 1
                self._reconnecting = None
                if not self._pending:
                    self._lost_since = None
                log.info("reconnected to %s", self.raddr)
                self._start(conn)
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
                pending.future.set_exception(DrafterError(str(error)))
