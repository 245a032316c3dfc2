"""An emulated long-distance link: a TCP proxy that adds delay and caps the rate.

This kernel has no netem (see /work/shared/MACHINE-NOTES.md), so the benches put this
proxy between two ends instead. Each direction is one bottleneck shared by all
connections through the link:

- a byte read from one end is serialized at ``rate`` (bytes/s) behind the bytes read
  before it in the same direction, then arrives ``rtt/2`` later at the other end;
- the proxy holds at most ``rate * rtt/2`` bytes in flight plus ``queue_bytes`` queued
  per direction; beyond that it stops reading, so the sender's own socket fills and
  backpressure reaches it as on a real link with a bounded bottleneck queue.

At ``rtt_ms=0`` it is a paced proxy; without a rate cap (``rate=0``) it forwards as
fast as it can, still holding at most ``queue_bytes`` per direction (with a delay
that bounds the throughput to ``queue_bytes / (rtt/2)``).

It does not emulate loss or the end hosts' TCP windows: the proxy's own sockets are on
loopback, so a sender sees the link's rate after one round trip, never slow start.

Library use::

    link = Link("127.0.0.1", 1337, rtt_ms=100, rate_bytes_per_s=125_000_000)
    port = await link.start()
    ...
    await link.close()
    link.bytes_to_target, link.bytes_to_client

As a separate process (so it does not compete with what is measured for the GIL)::

    python bench/link.py --target 127.0.0.1:1337 --rtt-ms 100 --rate-mbit 1000

prints ``listening on 127.0.0.1:PORT`` once ready; SIGUSR1 prints the byte counts so
far as a JSON line; SIGINT or SIGTERM prints them a last time and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections import deque

MIB = 1 << 20
DEFAULT_QUEUE_BYTES = MIB


class _Bottleneck:
    """One direction of the link: the serialization clock and the bytes it holds."""

    def __init__(self, rate: float, delay: float, queue_bytes: int) -> None:
        self.rate = rate  # bytes/s; 0 = no cap
        self.delay = delay  # one-way, seconds
        self.limit = int(rate * delay) + queue_bytes  # in flight + queued
        self.held = 0
        self.next_free = 0.0  # when the bottleneck has sent what it holds
        self.paused: set[_Pipe] = set()  # pipes whose source waits for room

    def schedule(self, size: int, now: float) -> float:
        """When ``size`` bytes read now arrive at the far end."""
        if self.rate:
            self.next_free = max(now, self.next_free) + size / self.rate
            return self.next_free + self.delay
        return now + self.delay

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes; False when the source must stop reading."""
        self.held += size
        return self.held < self.limit

    def give(self, size: int) -> None:
        """``size`` bytes left the link: let waiting sources read again."""
        self.held -= size
        if self.held < self.limit and self.paused:
            for pipe in list(self.paused):
                pipe.resume_source()


class _Pipe:
    """One direction of one connection: bytes from ``src`` on their way to ``dst``."""

    def __init__(self, conn: _Connection, bottleneck: _Bottleneck, to_target: bool) -> None:
        self.conn = conn
        self.bottleneck = bottleneck
        self.to_target = to_target
        self.loop = conn.loop
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.pending: deque[tuple[float, bytes | None]] = deque()  # None: end of stream
        self.pending_bytes = 0
        self.last_release = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.dst_paused = False
        self.eof = False  # the source ended (or its connection was lost)
        self.done = False  # the end was delivered, or the destination is gone

    def feed(self, data: bytes) -> None:
        size = len(data)
        link = self.conn.link
        if self.to_target:
            link.bytes_to_target += size
        else:
            link.bytes_to_client += size
        release = self.bottleneck.schedule(size, self.loop.time())
        self.last_release = release
        self.pending.append((release, data))
        self.pending_bytes += size
        if not self.bottleneck.take(size):
            self.pause_source()
        self.kick()

    def feed_eof(self) -> None:
        if self.eof:
            return
        self.eof = True
        release = max(self.last_release, self.loop.time() + self.bottleneck.delay)
        self.pending.append((release, None))
        self.kick()

    def pause_source(self) -> None:
        if self.src is not None and not self.src.is_closing():
            self.src.pause_reading()
        self.bottleneck.paused.add(self)

    def resume_source(self) -> None:
        self.bottleneck.paused.discard(self)
        if self.src is not None and not self.src.is_closing() and not self.eof:
            self.src.resume_reading()

    def kick(self) -> None:
        """Deliver what is due now; set a timer for the next piece."""
        if self.timer is not None or self.dst_paused or not self.pending:
            return
        release = self.pending[0][0]
        if release <= self.loop.time():
            self.flush()
        else:
            self.timer = self.loop.call_at(release, self.flush)

    def flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        dst = self.dst
        while self.pending and not self.dst_paused and self.pending[0][0] <= now:
            _, data = self.pending.popleft()
            if data is None:
                if dst is not None and not dst.is_closing() and dst.can_write_eof():
                    dst.write_eof()
                self.done = True
                self.conn.check_done()
                return
            self.pending_bytes -= len(data)
            if dst is not None and not dst.is_closing():
                dst.write(data)  # may call pause_writing at once
            self.bottleneck.give(len(data))
        self.kick()

    def drop(self) -> None:
        """The destination is gone: forget what was on its way there."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending.clear()
        self.bottleneck.paused.discard(self)
        self.bottleneck.give(self.pending_bytes)
        self.pending_bytes = 0
        self.done = True


class _Side(asyncio.Protocol):
    """One socket of a connection (the client's or the target's)."""

    def __init__(self, conn: _Connection, outgoing: _Pipe, incoming: _Pipe) -> None:
        self.conn = conn
        self.outgoing = outgoing  # bytes this socket reads
        self.incoming = incoming  # bytes this socket writes
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.outgoing.src = transport
        self.incoming.dst = transport
        self.conn.side_made(self)

    def data_received(self, data: bytes) -> None:
        self.outgoing.feed(data)

    def eof_received(self) -> bool:
        self.outgoing.feed_eof()
        return True  # keep the socket open: the other direction may still carry bytes

    def pause_writing(self) -> None:
        self.incoming.dst_paused = True

    def resume_writing(self) -> None:
        self.incoming.dst_paused = False
        self.incoming.kick()

    def connection_lost(self, exc: Exception | None) -> None:
        self.outgoing.feed_eof()
        self.incoming.drop()
        self.conn.check_done()


class _Connection:
    """A client connection and its connection to the target."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.up = _Pipe(self, link.up, to_target=True)
        self.down = _Pipe(self, link.down, to_target=False)
        self.client = _Side(self, self.up, self.down)
        self.target = _Side(self, self.down, self.up)
        self.closed = False

    def side_made(self, side: _Side) -> None:
        if side is self.client:
            assert side.transport is not None
            side.transport.pause_reading()  # until the target answers
            self.link.connections.add(self)
            self.link.connection_count += 1
            task = self.loop.create_task(self.connect())
            self.link.tasks.add(task)
            task.add_done_callback(self.link.tasks.discard)

    async def connect(self) -> None:
        link = self.link
        try:
            await self.loop.create_connection(lambda: self.target, link.target_host,
                                              link.target_port)  # fmt: skip
        except OSError:
            self.close()
            return
        if self.closed:
            self.close()
            return
        assert self.client.transport is not None
        if not self.up.eof and self.up not in link.up.paused:
            self.client.transport.resume_reading()

    def check_done(self) -> None:
        if self.up.done and self.down.done:
            self.close()

    def close(self) -> None:
        """Close both sockets (again after a late connect: it closes that one too)."""
        self.closed = True
        for pipe in (self.up, self.down):
            pipe.drop()
        for side in (self.client, self.target):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()
        self.link.connections.discard(self)


class Link:
    """A TCP proxy to ``target`` emulating a link of ``rtt_ms`` and a rate cap per direction.

    ``rate_bytes_per_s`` 0 means no cap. ``bytes_to_target`` and ``bytes_to_client``
    count what the proxy read from each end (all connections, since ``start``).
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        rtt_ms: float,
        rate_bytes_per_s: float,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        listen_port: int = 0,
        listen_host: str = "127.0.0.1",
    ) -> None:
        if rtt_ms < 0 or rate_bytes_per_s < 0 or queue_bytes <= 0:
            raise ValueError("rtt_ms and rate must be >= 0, queue_bytes > 0")
        self.target_host = target_host
        self.target_port = target_port
        self.rtt_ms = rtt_ms
        self.rate = rate_bytes_per_s
        self.queue_bytes = queue_bytes
        self.listen_host = listen_host
        self.listen_port = listen_port
        delay = rtt_ms / 2000
        self.up = _Bottleneck(rate_bytes_per_s, delay, queue_bytes)  # client → target
        self.down = _Bottleneck(rate_bytes_per_s, delay, queue_bytes)  # target → client
        self.bytes_to_target = 0
        self.bytes_to_client = 0
        self.connection_count = 0
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; return the port."""
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.Protocol:
            return _Connection(self).client

        self.server = await loop.create_server(factory, self.listen_host, self.listen_port)
        self.listen_port = int(self.server.sockets[0].getsockname()[1])
        return self.listen_port

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)
            self.server = None

    def counts(self) -> dict[str, int | float]:
        return {
            "bytes_to_target": self.bytes_to_target,
            "bytes_to_client": self.bytes_to_client,
            "connections": self.connection_count,
            "rtt_ms": self.rtt_ms,
            "rate_bytes_per_s": self.rate,
        }


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


async def serve(args: argparse.Namespace) -> None:
    host, port = args.target
    listen_host, listen_port = args.listen
    link = Link(
        host,
        port,
        args.rtt_ms,
        args.rate_mbit * 1e6 / 8,
        queue_bytes=args.queue_bytes,
        listen_port=listen_port,
        listen_host=listen_host,
    )
    port = await link.start()
    print(f"listening on {listen_host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(json.dumps(link.counts()), flush=True))
    try:
        await stop.wait()
    finally:
        await link.close()
        print(json.dumps(link.counts()), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--target", type=parse_addr, required=True, help="HOST:PORT to forward to")
    p.add_argument("--listen", type=parse_addr, default=("127.0.0.1", 0),
                   help="HOST:PORT to listen on (port 0: a free one)")  # fmt: skip
    p.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time to add")
    p.add_argument("--rate-mbit", type=float, default=0.0,
                   help="rate cap per direction in Mbit/s (0: none)")  # fmt: skip
    p.add_argument("--queue-bytes", type=int, default=DEFAULT_QUEUE_BYTES,
                   help="bottleneck queue per direction beyond the bytes in flight")  # fmt: skip
    args = p.parse_args(argv)
    if args.rtt_ms < 0 or args.rate_mbit < 0 or args.queue_bytes <= 0:
        p.error("--rtt-ms and --rate-mbit must be >= 0, --queue-bytes > 0")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
