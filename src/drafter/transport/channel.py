"""One connection: frames in and out, sealed once there are seals.

Frames are parsed by :class:`FrameProtocol`, an asyncio buffered protocol that lets
the kernel copy a large frame body (a chunk) straight into its own buffer: no stream
buffer in between, so a chunk is copied once on its way in.

A sealed frame is followed by a 16-byte tag (see :mod:`drafter.transport.security`)
that covers the header and the body, or for a CHUNK the header and the fixed part
(which holds the BLAKE3 hash of the payload: the receiver checks the payload against
it, so one hash pass both verifies the chunk and binds it to the tag).
"""

from __future__ import annotations

import asyncio
from collections import deque

from drafter.transport.protocol import (
    CHUNK_FIXED,
    HANDSHAKE_MAX_BODY,
    HEADER_SIZE,
    MAX_BODY,
    ChunkHead,
    ErrorCode,
    MsgType,
    ProtocolError,
    header,
    parse_header,
)
from drafter.transport.security import TAG_SIZE, Seal

_SCRATCH = 16 * 1024  # receive buffer for headers and small frames
_DIRECT = 16 * 1024  # a body with at least this much still to come is received in place
_QUEUE_LIMIT = 2 * MAX_BODY  # parsed but unread bytes before reading pauses
_FRAME_COST = 256  # what a queued frame costs beyond its body (its objects), for that limit

Frame = tuple[bytes, bytearray, bytes]  # header, body, tag (b"" when not sealed)


class FrameProtocol(asyncio.BufferedProtocol):
    """Splits the byte stream into frames; ``max_body`` and ``tag_size`` apply to the
    frames parsed from then on."""

    def __init__(self, queue_limit: int = _QUEUE_LIMIT) -> None:
        self.max_body = HANDSHAKE_MAX_BODY
        self.tag_size = 0
        self.queue_limit = queue_limit
        # The next frame may be an ERROR without a tag: a server that refuses the
        # client's proof answers before it has seals (one frame only).
        self.untagged_error = False
        self._tagged = False
        self.transport: asyncio.Transport | None = None
        self._scratch = bytearray(_SCRATCH)
        self._scratch_view = memoryview(self._scratch)
        self._head = bytearray()
        self._body: bytearray | None = None
        self._pos = 0
        self._tag = bytearray()
        self._direct = False
        self._frames: deque[Frame] = deque()
        self._spare: dict[int, list[bytearray]] = {}  # body buffers given back, by size
        self._queued = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._eof = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.discard = False  # drop what arrives (a connection being closed)
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        body = self._body
        if body is not None and len(body) - self._pos >= _DIRECT:
            self._direct = True
            return memoryview(body)[self._pos :]
        self._direct = False
        return self._scratch_view

    def buffer_updated(self, nbytes: int) -> None:
        if self.discard:
            return
        if self._direct:
            self._pos += nbytes
            if self._body is not None and self._pos == len(self._body):
                self._body_done()
            return
        data = self._scratch_view[:nbytes]
        try:
            self._feed(data)
        except ProtocolError as e:
            self._fail(e)
        finally:
            data.release()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._wake()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the connection was lost"))
        self._drain_waiters.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # -- parsing ------------------------------------------------------------------------

    def _feed(self, data: memoryview) -> None:
        i = 0
        n = len(data)
        while i < n and self._error is None:
            if self._body is None:
                take = min(HEADER_SIZE - len(self._head), n - i)
                self._head += data[i : i + take]
                i += take
                if len(self._head) == HEADER_SIZE:
                    length, kind, _id = parse_header(bytes(self._head), self.max_body)
                    self._tagged = self.tag_size > 0 and not (
                        self.untagged_error and kind == MsgType.ERROR
                    )
                    self.untagged_error = False
                    spare = self._spare.get(length)
                    self._body = spare.pop() if spare else bytearray(length)
                    self._pos = 0
                    if length == 0:
                        self._body_done()
            elif self._pos < len(self._body):
                take = min(len(self._body) - self._pos, n - i)
                self._body[self._pos : self._pos + take] = data[i : i + take]
                self._pos += take
                i += take
                if self._pos == len(self._body):
                    self._body_done()
            else:  # the tag
                take = min(self.tag_size - len(self._tag), n - i)
                self._tag += data[i : i + take]
                i += take
                if len(self._tag) == self.tag_size:
                    self._emit()

    def _body_done(self) -> None:
        if not self._tagged:
            self._emit()

    def _emit(self) -> None:
        assert self._body is not None
        frame = (bytes(self._head), self._body, bytes(self._tag))
        self._head = bytearray()
        self._body = None
        self._tag = bytearray()
        self._pos = 0
        self._frames.append(frame)
        self._queued += len(frame[1]) + _FRAME_COST
        if self._queued > self.queue_limit and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- for the Channel ----------------------------------------------------------------

    def recycle(self, body: bytearray) -> None:
        """A frame body nobody refers to any more: reuse it for a frame of its size
        (a fresh buffer costs page faults and zeroing on every chunk)."""
        spare = self._spare.setdefault(len(body), [])
        if len(spare) < 4:
            spare.append(body)

    async def until_eof(self) -> None:
        """Drop whatever arrives until the other side closes."""
        self.discard = True
        self._frames.clear()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        while not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    async def next_frame(self) -> Frame:
        while not self._frames:
            if self._error is not None:
                raise self._error
            if self._eof:
                partial = bytes(self._head) if self._body is None else b"?"
                raise asyncio.IncompleteReadError(partial, None)
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        frame = self._frames.popleft()
        self._queued -= len(frame[1]) + _FRAME_COST
        if self._reading_paused and self._queued <= self.queue_limit // 2 and self._error is None:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        return frame

    async def drain(self) -> None:
        if self.transport is not None and self.transport.is_closing():
            await asyncio.sleep(0)
            if self.closed.done():
                raise ConnectionResetError("the connection is closed")
        if self._write_paused:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter


class Channel:
    """Frames over one connection; seals are added once the handshake made them."""

    def __init__(self, transport: asyncio.Transport, protocol: FrameProtocol) -> None:
        self.transport = transport
        self.protocol = protocol
        self._send: Seal | None = None
        self._recv: Seal | None = None
        # Small frames written in one event-loop turn go out in one send (a burst of
        # requests costs one system call, not one each).
        self._outbox: list[bytes] = []
        self._flush_scheduled = False

    def seal(self, send: Seal | None, recv: Seal | None) -> None:
        """From now on, frames out carry tags from ``send``, frames in are checked with
        ``recv``; and the handshake's small size limit no longer applies."""
        self._send = send
        self._recv = recv
        self.protocol.tag_size = TAG_SIZE if recv is not None else 0
        self.protocol.max_body = MAX_BODY

    async def read(self) -> tuple[int, int, bytes | bytearray]:
        """``(type, request id, body)``; ProtocolError for a bad or forged frame,
        asyncio.IncompleteReadError when the connection ends."""
        head, body, tag = await self.protocol.next_frame()
        _length, kind, request_id = parse_header(head, MAX_BODY)
        # An ERROR without a tag: only what the protocol let through as the answer to
        # a proof (see FrameProtocol.untagged_error); it ends the connection anyway.
        if self._recv is not None and not (kind == MsgType.ERROR and not tag):
            covered = memoryview(body)[:CHUNK_FIXED] if kind == MsgType.CHUNK else body
            if len(tag) != TAG_SIZE or not self._recv.check(head, covered, tag):
                raise ProtocolError(
                    ErrorCode.AUTH, "a frame failed authentication (changed in flight?)"
                )
        return kind, request_id, body

    def write(self, kind: int, body: bytes = b"", request_id: int = 0) -> None:
        """Queue a frame; it goes out at the end of this event-loop turn at the latest."""
        head = header(kind, len(body), request_id)
        tag = self._send.tag(head, body) if self._send is not None else b""
        self._outbox.append(head + body + tag)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send the queued small frames now."""
        self._flush_scheduled = False
        if self._outbox:
            data = b"".join(self._outbox)
            self._outbox.clear()
            if not self.transport.is_closing():
                self.transport.write(data)

    def write_chunk(self, request_id: int, chunk: ChunkHead, payload: bytes = b"") -> None:
        """A CHUNK frame: fixed part, then the payload (written without joining it)."""
        fixed = chunk.encode()
        head = header(MsgType.CHUNK, len(fixed) + len(payload), request_id)
        tag = self._send.tag(head, fixed) if self._send is not None else b""
        self.flush()
        self.transport.write(head + fixed)
        if payload:
            self.transport.write(payload)
        if tag:
            self.transport.write(tag)

    async def drain(self) -> None:
        self.flush()
        await self.protocol.drain()

    def must_wait(self) -> bool:
        """Whether a drain would wait (the send buffer is above its high-water mark)."""
        return self.protocol._write_paused or self.transport.is_closing()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def abort(self) -> None:
        self.transport.abort()

    async def close(self, linger: float = 1.0) -> None:
        """Close (after what is written has gone out); abort after ``linger`` seconds."""
        self.flush()
        if not self.transport.is_closing():
            self.transport.close()
        try:
            async with asyncio.timeout(linger):
                await asyncio.shield(self.protocol.closed)
        except TimeoutError:
            self.transport.abort()

    def peer(self) -> str:
        from drafter.transport.protocol import format_addr

        peername = self.transport.get_extra_info("peername")
        return format_addr(*peername[:2]) if peername else "?"
