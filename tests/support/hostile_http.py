"""A small HTTP/1.1 object server on loopback that can be told to misbehave.

It serves objects held in memory by path, the way an object store's HTTP endpoint does
(GET and HEAD; single ``Range: bytes=...`` requests answered with 206, Content-Range
and Content-Length; a strong ETag; ``If-Match`` / ``If-None-Match``; persistent
connections), for tests of clients that must treat what a store sends as hostile. It
runs in a thread of its own with its own event loop, so sync and async tests can both
use it, and it listens on 127.0.0.1 only, on a port the OS chooses::

    with HostileServer() as server:
        etag = server.put("pkg/index", data)
        server.fault(Fault.FLIP_BYTE, offset=10)
        store = HTTPStore(server.url, client_options={"allow_http": True})

Faults apply to GET requests only (HEAD is always answered truthfully, from the objects
as they are then). :meth:`HostileServer.fault` adds a rule; ``Fault.NONE`` removes them
all. Each rule counts the GET requests it could apply to (those to its ``path``, or to
any path) from the moment it was added: it applies to those numbered ``after`` (from 0)
to ``after + count - 1``, or from ``after`` on if ``count`` is None. When several rules
apply to one request, REPLACE rules take effect first, then the rule added first of the
others decides the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from email.utils import formatdate
from types import TracebackType

LOOPBACK = "127.0.0.1"
MAX_HEAD = 64 * 1024  # bytes of request line and headers
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>hostile</RequestId></Error>"
)
REASONS = {
    200: "OK",
    206: "Partial Content",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    412: "Precondition Failed",
    416: "Range Not Satisfiable",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    503: "Service Unavailable",
}
RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class Fault(enum.Enum):
    """How the server misbehaves for the GET requests a rule applies to."""

    NONE = "none"  # (to :meth:`HostileServer.fault`) remove every rule
    FLIP_BYTE = "flip-byte"  # flip (xor 0xFF) the byte at object offset ``offset``, if sent
    WHOLE_OBJECT = "whole-object"  # answer a Range request with 200 and the whole object
    TRUNCATE = "truncate"  # right headers, half the body, then close the connection
    WRONG_LENGTH = "wrong-length"  # one byte fewer than asked (more if 1 was), headers agree
    UNAVAILABLE = "unavailable"  # 503, Retry-After: 0, an S3 SlowDown XML body
    REPLACE = "replace"  # the objects are replaced (every byte xor 0xFF, new ETag)
    STALL = "stall"  # read the request, never answer (until the server stops)


@dataclass
class Rule:
    fault: Fault
    after: int
    count: int | None
    offset: int | None
    path: str | None
    seen: int = 0  # GET requests this rule could apply to, so far

    def take(self, path: str) -> bool:
        """Count one GET request to ``path``; whether this rule applies to it."""
        if self.path is not None and path != self.path:
            return False
        n = self.seen
        self.seen += 1
        return n >= self.after and (self.count is None or n < self.after + self.count)


@dataclass(frozen=True)
class StoredObject:
    data: bytes
    etag: str
    last_modified: str


def make_object(data: bytes) -> StoredObject:
    etag = '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'  # as S3 does
    return StoredObject(bytes(data), etag, formatdate(time.time(), usegmt=True))


def etags(header: str) -> list[str]:
    """The entity tags listed in an If-Match / If-None-Match header (``*`` kept)."""
    return [tag.strip() for tag in header.split(",") if tag.strip()]


def opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The byte range ``[start, end)`` one ``bytes=`` range asks for, or None if it
    cannot be satisfied (malformed, several ranges, or nothing of the object in it)."""
    m = RANGE.fullmatch(header.strip().replace(" ", ""))
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if first:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
        if last and int(last) < start:
            return None
    elif last:  # bytes=-N: the last N bytes
        start, end = max(size - int(last), 0), size
        if int(last) == 0:
            return None
    else:
        return None
    return (start, end) if start < end else None


class HostileServer:
    """Objects in memory over HTTP/1.1 on 127.0.0.1; see the module's docstring."""

    def __init__(self) -> None:
        self.objects: dict[str, StoredObject] = {}
        self.rules: list[Rule] = []
        # (method, path, Range header) of every request read, in order.
        self.requests: list[tuple[str, str, str | None]] = []
        self.headers: list[dict[str, str]] = []  # the headers of each, names lower-case
        self.connections = 0  # connections accepted so far
        self.port = 0
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping: asyncio.Event | None = None  # set (in the loop) when stop() begins

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/"

    # What tests call.

    def put(self, path: str, data: bytes) -> str:
        """Store ``data`` at ``path`` (no leading slash); return its ETag (quoted)."""
        obj = make_object(data)
        with self.lock:
            self.objects[path.lstrip("/")] = obj
        return obj.etag

    def data(self, path: str) -> bytes:
        """The bytes now stored at ``path``."""
        with self.lock:
            return self.objects[path.lstrip("/")].data

    def etag(self, path: str) -> str:
        """The ETag of what is now stored at ``path``."""
        with self.lock:
            return self.objects[path.lstrip("/")].etag

    def fault(
        self,
        fault: Fault,
        *,
        after: int = 0,
        count: int | None = None,
        offset: int | None = None,
        path: str | None = None,
    ) -> None:
        """Misbehave for GET requests (to ``path``, or any) from the ``after``-th one
        counted from now, for ``count`` of them (None: for ever). ``offset``: the object
        offset FLIP_BYTE flips. ``Fault.NONE`` removes every rule."""
        if fault is Fault.FLIP_BYTE and offset is None:
            raise ValueError("FLIP_BYTE needs an offset")
        with self.lock:
            if fault is Fault.NONE:
                self.rules.clear()
            else:
                self.rules.append(Rule(fault, after, count, offset, path and path.lstrip("/")))

    def gets(self, path: str | None = None) -> int:
        """How many GET requests (to ``path``, or to any) the server has read."""
        return sum(1 for m, p, _ in self.requests if m == "GET" and path in (None, p))

    def start(self) -> None:
        """Listen (on a port the OS picks) and serve in a thread of its own."""
        if self.thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            try:
                self.stopping = asyncio.Event()
                self.server = loop.run_until_complete(
                    asyncio.start_server(self.serve, LOOPBACK, 0, limit=MAX_HEAD)
                )
                self.port = self.server.sockets[0].getsockname()[1]
            except BaseException as e:
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self.thread = threading.Thread(target=run, name="hostile-http", daemon=True)
        self.thread.start()
        ready.wait()
        if failure:
            self.thread.join()
            self.thread = None
            raise failure[0]

    def stop(self) -> None:
        """Close the listener and every connection (stalled ones too); end the thread."""
        thread, loop = self.thread, self.loop
        if thread is None or loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.shut(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self.thread = None
        self.loop = None

    def __enter__(self) -> HostileServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # The event loop's side.

    async def shut(self) -> None:
        assert self.stopping is not None
        self.stopping.set()  # stalled requests end
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()  # connections waiting for a request end
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)
        if self.server is not None:
            await self.server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.add(writer)
        with self.lock:
            self.connections += 1
        try:
            while await self.one_request(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away, or sent too much
        finally:
            self.tasks.discard(task)
            self.writers.discard(writer)
            writer.transport.abort()

    async def one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read and answer one request; whether the connection stays open."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # closed between requests
        except asyncio.LimitOverrunError:
            await self.send(writer, 431, {}, b"", close=True)
            return False
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self.send(writer, 400, {}, b"", close=True)
            return False
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:  # no request of ours has a chunked body
            await self.send(writer, 501, {}, b"", close=True)
            return False
        length = headers.get("content-length", "0")
        if not length.isdigit():
            await self.send(writer, 400, {}, b"", close=True)
            return False
        if int(length):
            await reader.readexactly(int(length))
        keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        path = urllib.parse.unquote(urllib.parse.urlsplit(target).path).lstrip("/")
        with self.lock:
            self.requests.append((method, path, headers.get("range")))
            self.headers.append(headers)
            fault = self.decide(method, path)
            obj = self.objects.get(path)
        if method not in ("GET", "HEAD"):
            return await self.send(writer, 405, {"Allow": "GET, HEAD"}, b"", close=not keep)
        if fault is not None and fault.fault is Fault.STALL:
            assert self.stopping is not None
            await self.stopping.wait()
            return False
        if fault is not None and fault.fault is Fault.UNAVAILABLE:
            extra = {"Retry-After": "0", "Content-Type": "application/xml"}
            return await self.send(writer, 503, extra, SLOW_DOWN, close=not keep)
        if obj is None:
            return await self.send(writer, 404, {}, b"", close=not keep)
        meta = {"ETag": obj.etag, "Last-Modified": obj.last_modified, "Accept-Ranges": "bytes"}
        if (tags := headers.get("if-match")) is not None and not any(
            t == "*" or t == obj.etag for t in etags(tags)
        ):
            return await self.send(writer, 412, {"ETag": obj.etag}, b"", close=not keep)
        if (tags := headers.get("if-none-match")) is not None and any(
            t == "*" or opaque(t) == obj.etag for t in etags(tags)
        ):
            return await self.send(writer, 304, meta, b"", close=not keep, head=True)
        size = len(obj.data)
        ask = headers.get("range") if method == "GET" else None
        if ask is not None and not (fault is not None and fault.fault is Fault.WHOLE_OBJECT):
            span = parse_range(ask, size)
            if span is None:
                extra = {"Content-Range": f"bytes */{size}"}
                return await self.send(writer, 416, extra, b"", close=not keep)
            status = 206
        else:
            status, span = 200, (0, size)
        start, end = span
        if fault is not None and fault.fault is Fault.WRONG_LENGTH:
            end = end - 1 if end - start > 1 else min(end + 1, size)
        if status == 206:
            meta["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        body = obj.data[start:end]
        if fault is not None and fault.fault is Fault.FLIP_BYTE:
            assert fault.offset is not None
            if start <= fault.offset < end:
                flipped = bytearray(body)
                flipped[fault.offset - start] ^= 0xFF
                body = bytes(flipped)
        if method == "HEAD":
            return await self.send(writer, 200, meta, body, close=not keep, head=True)
        if fault is not None and fault.fault is Fault.TRUNCATE:
            await self.send(writer, status, meta, body, close=True, cut=len(body) // 2)
            return False
        return await self.send(writer, status, meta, body, close=not keep)

    def decide(self, method: str, path: str) -> Rule | None:
        """(Under the lock.) Count a GET against every rule, carry out the REPLACE rules
        that apply and return the first other rule that does."""
        if method != "GET":
            return None
        chosen: Rule | None = None
        for rule in self.rules:
            if not rule.take(path):
                continue
            if rule.fault is Fault.REPLACE:
                for key, obj in list(self.objects.items()):
                    if rule.path in (None, key):
                        self.objects[key] = make_object(bytes(b ^ 0xFF for b in obj.data))
                rule.count = 0  # once
            elif chosen is None:
                chosen = rule
        return chosen

    async def send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        headers: dict[str, str],
        body: bytes,
        *,
        close: bool,
        head: bool = False,
        cut: int | None = None,
    ) -> bool:
        """Write one response: ``head``, headers only (Content-Length still the body's);
        ``cut``, only that many bytes of the body. Whether the connection stays open."""
        lines = [f"HTTP/1.1 {status} {REASONS[status]}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        lines.append(f"Date: {formatdate(time.time(), usegmt=True)}")
        if close:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head:
            writer.write(body if cut is None else body[:cut])
        await writer.drain()
        if close:
            with contextlib.suppress(OSError):
                writer.close()
        return not close
