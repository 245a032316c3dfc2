"""Helpers for the wire tests (test_wire.py, test_wire_hostile.py and the client's).

A synthetic package (no QEMU), servers over it, a pull that checks every chunk, a
hand-driven client (:class:`Raw`) that speaks protocol v2 byte by byte, a proxy that
can change frames in flight, and ``drafter-registry`` as a subprocess whose memory
and CPU time can be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from drafter.package import RESOURCES, PackageConfig, Source, open_package, write_package
from drafter.transport import protocol as wire
from drafter.transport import security
from drafter.transport.client import Priority, RemoteSource
from drafter.transport.protocol import MsgType
from drafter.transport.registry import PackageProvider
from drafter.transport.server import ChunkServer, ServerLimits
from support.common import command, stop_process
from support.net import LOOPBACK

CHUNK = 64 * 1024
MIB = 1 << 20
SERVER_LOG = "drafter.transport.server"
HOT = {"memory": [(0, 100), (3 * MIB + MIB // 2, 10)]}  # chunks 0 and 56 of memory

_HEADER = struct.Struct(">IBBHI")


# --- the package ---------------------------------------------------------------------


def build_package(directory: Path) -> Path:
    """A 4 MiB-memory package with random data, text, holes, odd-sized resources and
    two hot ranges."""
    rnd = random.Random(7)
    files: dict[str, Path] = {}
    contents = {
        "state": rnd.randbytes(100_000),
        "kernel": rnd.randbytes(300_001),
        "initramfs": b"initramfs" * 1000,
    }
    for name, data in contents.items():
        files[name] = directory / name
        files[name].write_bytes(data)
    files["memory"] = directory / "memory"
    with files["memory"].open("wb") as f:
        f.write(rnd.randbytes(MIB))  # then a 2.5 MiB hole
        f.truncate(4 * MIB)
        f.seek(3 * MIB + MIB // 2)
        f.write(rnd.randbytes(MIB // 4))  # then a 256 KiB hole to the end
    files["disk"] = directory / "disk"
    with files["disk"].open("wb") as f:
        f.write(b"disk" * 1000)
        f.truncate(2 * MIB)
        f.seek(2 * MIB - 5)
        f.write(b"last!")
    pkg = directory / "wire.drft"
    sources: dict[str, Source | Path] = dict(files)
    config = PackageConfig(4, 1, "console=ttyS0", "02:00:00:00:00:01")
    write_package(pkg, config, sources, hot=HOT)
    return pkg


def contents(pkg: Path) -> dict[str, bytes]:
    opened = open_package(pkg)
    return {r: opened.read(r) for r in RESOURCES if r != "config"}


def chunks_of(data: dict[str, bytes], chunk: int = CHUNK) -> list[tuple[str, int, bytes]]:
    return [
        (r, i // chunk, blob[i : i + chunk])
        for r, blob in data.items()
        for i in range(0, len(blob), chunk)
    ]


def zero_chunk_count(data: dict[str, bytes], chunk: int = CHUNK) -> int:
    return sum(1 for _, _, c in chunks_of(data, chunk) if c.count(0) == len(c))


def data_chunks(data: dict[str, bytes], chunk: int = CHUNK) -> list[tuple[str, int]]:
    """(resource, index) of every chunk that is not all zeros: what a client requests."""
    return [(r, i) for r, i, c in chunks_of(data, chunk) if c.count(0) != len(c)]


# --- servers -------------------------------------------------------------------------


class WrappedProvider:
    """Serves what ``inner`` serves; subclasses change how chunks are read."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.chunk_size = inner.chunk_size

    def manifest(self) -> dict[str, int]:
        return self.inner.manifest()

    def config(self) -> bytes:
        return self.inner.config()

    async def hashes(self, resource: str) -> list[bytes]:
        return await self.inner.hashes(resource)

    def hot(self) -> dict[str, list[int]]:
        return self.inner.hot()

    async def read_chunk(self, resource: str, index: int) -> tuple[bytes, bytes | None]:
        return await self.inner.read_chunk(resource, index)


class SlowProvider(WrappedProvider):
    """A provider that takes ``delay`` seconds per chunk (to keep queues full)."""

    def __init__(self, inner: Any, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    async def read_chunk(self, resource: str, index: int) -> tuple[bytes, bytes | None]:
        await asyncio.sleep(self.delay)
        return await self.inner.read_chunk(resource, index)


async def start_server(
    pkg: Path,
    delay: float = 0.0,
    port: int = 0,
    limits: ServerLimits | None = None,
    provider: Any = None,
    **kwargs: Any,
) -> ChunkServer:
    if provider is None:
        provider = PackageProvider(open_package(pkg), CHUNK)
    if delay:
        provider = SlowProvider(provider, delay)
    server = ChunkServer(provider, limits)
    await server.start(LOOPBACK, port, **kwargs)
    return server


async def pull(
    source: RemoteSource,
    expected: dict[str, bytes],
    workers: int = 8,
    priority: Priority = Priority.BACKGROUND,
) -> dict[str, bytes]:
    """Fetch every chunk of every resource; check each one as it arrives."""
    assert source.manifest == {r: len(b) for r, b in expected.items()}
    jobs = [(r, i) for r in source.manifest for i in range(source.chunks(r))]
    jobs.reverse()
    out = {r: bytearray(size) for r, size in source.manifest.items()}

    async def worker() -> None:
        cs = source.chunk_size
        while jobs:
            r, i = jobs.pop()
            data = bytes(await source.fetch(r, i, priority))
            assert data == expected[r][i * cs : (i + 1) * cs], f"wrong bytes: {r} chunk {i}"
            out[r][i * cs : i * cs + len(data)] = data

    await asyncio.gather(*(worker() for _ in range(workers)))
    return {r: bytes(b) for r, b in out.items()}


async def timed_pull(
    port: int, expected: dict[str, bytes], token: str | None = None, rounds: int = 5
) -> float:
    """Seconds a fresh well-behaved client takes to connect and pull everything
    ``rounds`` times (each round fetches every chunk again)."""
    started = time.monotonic()
    source = RemoteSource(f"{LOOPBACK}:{port}", token=token, retry_timeout=5)
    try:
        await source.connect()
        for _ in range(rounds):
            assert await pull(source, expected) == expected
        assert source.reconnects == 0
    finally:
        await source.close()
    return time.monotonic() - started


def run(coro: Awaitable[Any], timeout: float = 30) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# --- a hand-driven client ------------------------------------------------------------


def read_header(head: bytes) -> tuple[int, int, int]:
    """``(length, type, request id)`` of a header, without any checks."""
    length, kind, _flags, _reserved, request_id = _HEADER.unpack(head)
    return length, kind, request_id


@dataclass
class Raw:
    """One connection driven by hand; frames are sealed once the handshake made seals."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    client_hello: bytes = b""
    server_hello: bytes = b""
    send: security.Seal | None = None
    recv: security.Seal | None = None
    welcome: wire.Welcome | None = None
    hashes: dict[int, list[bytes]] = field(default_factory=dict)

    @property
    def local(self) -> int:
        return int(self.writer.get_extra_info("sockname")[1])

    def write(self, kind: int, body: bytes = b"", request_id: int = 0) -> None:
        head = wire.header(kind, len(body), request_id)
        tag = self.send.tag(head, body) if self.send is not None else b""
        self.writer.write(head + body + tag)

    def request(self, resource: int, index: int, request_id: int, count: int = 1) -> None:
        self.write(
            MsgType.REQUEST, wire.Request(Priority.DEMAND, resource, index, count).body(),
            request_id,
        )  # fmt: skip

    async def read(self, timeout: float = 5, sealed: bool | None = None) -> tuple[int, int, bytes]:
        """One frame from the server; its seal is checked (a failed check fails the test)."""
        sealed = self.recv is not None if sealed is None else sealed
        async with asyncio.timeout(timeout):
            head = await self.reader.readexactly(wire.HEADER_SIZE)
            length, kind, request_id = read_header(head)
            assert length <= wire.MAX_BODY, length
            body = await self.reader.readexactly(length)
            if sealed:
                assert self.recv is not None
                tag = await self.reader.readexactly(security.TAG_SIZE)
                covered = body[: wire.CHUNK_FIXED] if kind == MsgType.CHUNK else body
                assert self.recv.check(head, covered, tag), "a server frame failed its seal"
        return kind, request_id, body

    async def read_error(self, timeout: float = 5, sealed: bool | None = None) -> tuple[int, str]:
        """Skip answers until the ERROR frame: its code and text. The server closes
        the connection right after it."""
        while True:
            kind, _, body = await self.read(timeout, sealed)
            if kind == MsgType.ERROR:
                code, text = wire.decode_error(body)
                async with asyncio.timeout(timeout):
                    assert await self.reader.read() == b""
                return code, text

    async def closed_by_server(self, timeout: float) -> bool:
        """Whether the server closes the connection within ``timeout`` (what it sends
        before is dropped)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def abort(self) -> None:
        self.writer.transport.abort()


async def raw_open(
    port: int, rcvbuf: int | None = None, source: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection; ``rcvbuf`` shrinks our receive buffer (a client that does not
    read then fills the server's send buffer sooner); ``source``: from that address
    (another of 127.0.0.0/8: another client host, as the server sees it)."""
    sock = socket.socket()
    if source is not None:
        sock.bind((source, 0))
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, port))
    return await asyncio.open_connection(sock=sock)


async def raw_connect(
    port: int,
    version: int = wire.VERSION,
    token: str | None = None,
    greet: bool = True,
    rcvbuf: int | None = None,
    source: str | None = None,
) -> Raw:
    """A hand-driven client: hello, proof (from ``token``, zeros without one) and, with
    ``greet``, the welcome, hashes and hot list read and checked."""
    reader, writer = await raw_open(port, rcvbuf, source)
    raw = Raw(reader, writer)
    flags = wire.HELLO_TOKEN if token else 0
    raw.client_hello = wire.Hello(version, flags, security.new_nonce()).body()
    writer.write(wire.frame(MsgType.CLIENT_HELLO, raw.client_hello))
    if version != wire.VERSION:
        return raw
    kind, _, raw.server_hello = await raw.read(sealed=False)
    assert kind == MsgType.SERVER_HELLO, kind
    choice = bytes(2)
    proof = bytes(wire.PROOF_SIZE)
    if token:
        proof = security.client_proof(token, raw.client_hello, raw.server_hello + choice)
        raw.send, raw.recv = security.seals(token, raw.client_hello, raw.server_hello)
    writer.write(wire.frame(MsgType.AUTH, proof + choice))
    if greet:
        await greeting(raw)
    return raw


async def greeting(raw: Raw) -> None:
    """Read WELCOME, every HASHES frame and HOT."""
    kind, _, body = await raw.read()
    assert kind == MsgType.WELCOME, (kind, body[:100])
    raw.welcome = wire.Welcome.decode(body)
    while True:
        kind, _, body = await raw.read()
        if kind == MsgType.HOT:
            return
        assert kind == MsgType.HASHES, kind
        part = wire.Hashes.decode(body)
        got = raw.hashes.setdefault(part.resource, [])
        assert part.start == len(got)
        got.extend(part.hashes[i : i + 32] for i in range(0, len(part.hashes), 32))


def data_requests(raw: Raw) -> list[tuple[int, int]]:
    """(resource position, index) of every chunk a client would request."""
    return [(r, i) for r, hs in raw.hashes.items() for i, h in enumerate(hs) if h != wire.ZERO_HASH]


# --- logs ----------------------------------------------------------------------------


def records_for(caplog: pytest.LogCaptureFixture, port: int) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == SERVER_LOG and r.levelno >= logging.WARNING and f":{port}:" in r.getMessage()
    ]


async def one_line_logged(caplog: pytest.LogCaptureFixture, port: int, wait: float = 5) -> str:
    """Wait for the server's line about the client on ``port``; exactly one, no traceback."""
    deadline = time.monotonic() + wait
    while not records_for(caplog, port) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # a second line would come now
    found = records_for(caplog, port)
    assert len(found) == 1, [r.getMessage() for r in found]
    assert found[0].levelno == logging.WARNING
    assert found[0].exc_info is None
    return found[0].getMessage()


# --- a proxy that changes frames ------------------------------------------------------

# (frame number in this direction, type, header, body, tag) -> the bytes to forward
Mutate = Callable[[int, int, bytes, bytes, bytes], bytes]


class FrameProxy:
    """Forwards to ``target`` frame by frame. ``down`` sees the server's frames (0 is
    its hello), ``up`` the client's (0 is its hello, 1 its proof); with ``sealed``,
    frames after those carry a tag."""

    def __init__(
        self, target: int, sealed: bool, down: Mutate | None = None, up: Mutate | None = None
    ) -> None:
        self.target = target
        self.sealed = sealed
        self.down = down
        self.up = up
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._on_client, LOOPBACK, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        mutate: Mutate | None,
        unsealed: int,
    ) -> None:
        n = 0
        with contextlib.suppress(Exception):
            while True:
                head = await src.readexactly(wire.HEADER_SIZE)
                length, kind, _ = read_header(head)
                body = await src.readexactly(length)
                tag = b""
                # The first frame that may be sealed is an untagged ERROR when the
                # server refuses the proof.
                refusal = n == unsealed and kind == MsgType.ERROR
                if self.sealed and n >= unsealed and not refusal:
                    tag = await src.readexactly(security.TAG_SIZE)
                dst.write(mutate(n, kind, head, body, tag) if mutate else head + body + tag)
                await dst.drain()
                n += 1
        dst.transport.abort()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, self.up, 2)),
            asyncio.create_task(self._pump(up_reader, writer, self.down, 1)),
        ]
        self.tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        writer.transport.abort()
        up_writer.transport.abort()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# --- drafter-registry as a process ------------------------------------------------------


@dataclass
class Registry:
    """A running drafter-registry; its stderr goes to a file (a pipe nobody reads
    would block it)."""

    proc: subprocess.Popen[str]
    port: int
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def status(self, field_name: str) -> int:
        """A kB figure from /proc/PID/status (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field_name} for {self.proc.pid}")

    def rss_mib(self) -> float:
        return self.status("VmRSS") / 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time the process used so far."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self, sig: int = 2) -> int:
        return stop_process(self.proc, sig)


def start_registry(
    *args: str, stderr_path: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> Registry:
    """Start drafter-registry and wait for its ``serving ... on HOST:PORT`` line."""
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(
            [command("drafter-registry"), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline and not line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    if not line.startswith("serving "):
        stop_process(proc)
        raise AssertionError(f"no serving line: {line!r} {stderr_path.read_text()}")
    return Registry(proc, int(line.rsplit(":", 1)[1]), stderr_path)


def env_without_token() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != security.TOKEN_ENV}
