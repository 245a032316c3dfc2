"""One connection after the hellos: frames in and out, sealed when there is a seal.

A sealed frame is followed by a 16-byte tag (see :mod:`drafter.transport.security`)
that covers the header and the body, or for a CHUNK the header and the fixed part
(which holds the BLAKE3 hash of the payload: the receiver checks the payload against
it, so one hash pass both verifies the chunk and binds it to the tag).
"""

from __future__ import annotations

import asyncio

from drafter.transport.protocol import (
    CHUNK_FIXED,
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


class Channel:
    """Frames over one stream pair; ``send``/``recv`` seals or None (TLS or no token)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        send: Seal | None = None,
        recv: Seal | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._send = send
        self._recv = recv

    async def read(self, max_body: int = MAX_BODY) -> tuple[int, int, bytes]:
        """``(type, request id, body)``; ProtocolError for a bad or forged frame,
        asyncio.IncompleteReadError when the connection ends."""
        head = await self.reader.readexactly(HEADER_SIZE)
        length, kind, request_id = parse_header(head, max_body)
        body = await self.reader.readexactly(length) if length else b""
        if self._recv is not None:
            tag = await self.reader.readexactly(TAG_SIZE)
            covered = body[:CHUNK_FIXED] if kind == MsgType.CHUNK else body
            if not self._recv.check(head, covered, tag):
                raise ProtocolError(
                    ErrorCode.AUTH, "a frame failed authentication (changed in flight?)"
                )
        return kind, request_id, body

    def write(self, kind: int, body: bytes = b"", request_id: int = 0) -> None:
        head = header(kind, len(body), request_id)
        self.writer.write(head + body)
        if self._send is not None:
            self.writer.write(self._send.tag(head, body))

    def write_chunk(self, request_id: int, chunk: ChunkHead, payload: bytes = b"") -> None:
        """A CHUNK frame: fixed part, then the payload (written without joining it)."""
        fixed = chunk.encode()
        head = header(MsgType.CHUNK, len(fixed) + len(payload), request_id)
        self.writer.write(head + fixed)
        if payload:
            self.writer.write(payload)
        if self._send is not None:
            self.writer.write(self._send.tag(head, fixed))

    async def drain(self) -> None:
        await self.writer.drain()

    def buffered(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        return self.writer.transport.get_write_buffer_size()
