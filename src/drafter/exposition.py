"""The metrics' HTTP endpoint (``--metrics HOST:PORT``): ``GET /metrics`` answered
from a Prometheus registry, safe to leave running.

prometheus-client's own exposition server gives every connection a thread and a
descriptor with no timeout and no cap, so idle half-sent requests could take the
process's descriptors from the chunk server. This one is one thread with its own
event loop (the command's loop never waits for a scrape) and bounded in everything:
at most :data:`MAX_CONNECTIONS` connections (a new one past the cap drops the one
that has waited longest for its request, so a scraper always gets in), a request
head of at most :data:`MAX_HEAD` bytes read within :data:`HEAD_TIMEOUT` seconds, an
answer written within :data:`WRITE_TIMEOUT`, one request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 16
MAX_HEAD = 8192
HEAD_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
PATHS = (b"/metrics", b"/")


class _Connection:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.since = time.monotonic()
        self.reading = True  # still waiting for its request head


class Exposition:
    """``registry`` served on ``sock`` (bound and listening) until :meth:`close`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        sock: socket.socket,
        max_connections: int = MAX_CONNECTIONS,
        head_timeout: float = HEAD_TIMEOUT,
    ) -> None:
        self.registry = registry
        self.port = int(sock.getsockname()[1])
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.scrapes = 0
        self.dropped = 0  # connections closed to make room, or refused at the cap
        self._sock = sock
        self._open: dict[asyncio.Task[None], _Connection] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, sock=self._sock, limit=MAX_HEAD)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for task in list(self._open):
                task.cancel()
            self._loop.run_until_complete(
                asyncio.gather(*self._open, server.wait_closed(), return_exceptions=True)
            )
            self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._open) >= self.max_connections and not self._make_room():
            self.dropped += 1
            writer.close()
            return
        connection = self._open[task] = _Connection(writer)
        try:
            await self._answer(reader, writer, connection)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that went away or sent too much: nothing to answer
        except TimeoutError:
            log.debug("metrics: a connection timed out")
        finally:
            self._open.pop(task, None)  # gone already if it was dropped for room
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    def _make_room(self) -> bool:
        """Drop the connection that has waited longest for its request head; whether
        there was one (connections being answered are never dropped)."""
        waiting = [(c.since, t) for t, c in self._open.items() if c.reading]
        if not waiting:
            return False
        _, oldest = min(waiting, key=lambda item: item[0])
        oldest.cancel()
        self._open.pop(oldest)
        self.dropped += 1
        return True

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection
    ) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.head_timeout)
        connection.reading = False
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method not in (b"GET", b"HEAD"):
            status, body, kind = b"405 Method Not Allowed", b"only GET\n", b"text/plain"
        elif path not in PATHS:
            status, body, kind = b"404 Not Found", b"see /metrics\n", b"text/plain"
        else:
            self.scrapes += 1
            status, kind = b"200 OK", CONTENT_TYPE_LATEST.encode()
            body = generate_latest(self.registry)
        writer.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind
            + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + (body if method == b"GET" else b"")
        )  # fmt: skip
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)

    def close(self) -> None:
        """Stop serving: every connection closed, the thread ended."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (OSError if it cannot be had)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
