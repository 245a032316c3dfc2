"""The wire protocol over real loopback sockets: registry provider, chunk server, client.

Every chunk a client returns is checked against the package's bytes, so a torn or
misplaced chunk fails the test wherever it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_one_line_error, command, run_command, stop_process
from drafter.errors import DrafterError
from drafter.package import RESOURCES, PackageConfig, Source, open_package, write_package
from drafter.transport import protocol as wire
from drafter.transport import security
from drafter.transport.client import Priority, RemoteSource
from drafter.transport.protocol import ErrorCode, MsgType
from drafter.transport.registry import PackageProvider
from drafter.transport.server import ChunkServer

CHUNK = 64 * 1024
MIB = 1 << 20
LOOPBACK = "127.0.0.1"


# --- fixtures and helpers ----------------------------------------------------------


def build_package(directory: Path) -> Path:
    """A 4 MiB-memory package with random data, text, holes and odd-sized resources."""
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
    write_package(pkg, PackageConfig(4, 1, "console=ttyS0", "02:00:00:00:00:01"), sources)
    return pkg


@pytest.fixture
def package(workdir: Path) -> Path:
    return build_package(workdir)


def contents(pkg: Path) -> dict[str, bytes]:
    opened = open_package(pkg)
    return {r: opened.read(r) for r in RESOURCES if r != "config"}


def zero_chunk_count(data: dict[str, bytes], chunk: int = CHUNK) -> int:
    return sum(
        1
        for blob in data.values()
        for i in range(0, len(blob), chunk)
        if blob[i : i + chunk].count(0) == len(blob[i : i + chunk])
    )


class SlowProvider:
    """A PackageProvider that takes ``delay`` seconds per chunk (to keep queues full)."""

    def __init__(self, inner: PackageProvider, delay: float) -> None:
        self.inner = inner
        self.chunk_size = inner.chunk_size
        self.delay = delay

    def manifest(self) -> dict[str, int]:
        return self.inner.manifest()

    def config(self) -> bytes:
        return self.inner.config()

    async def read_chunk(self, resource: str, index: int) -> bytes:
        await asyncio.sleep(self.delay)
        return await self.inner.read_chunk(resource, index)


async def start_server(pkg: Path, delay: float = 0.0, port: int = 0, **kwargs: Any) -> ChunkServer:
    provider: Any = PackageProvider(open_package(pkg), CHUNK)
    if delay:
        provider = SlowProvider(provider, delay)
    server = ChunkServer(provider)
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
    jobs = [
        (r, i)
        for r, size in source.manifest.items()
        for i in range((size + source.chunk_size - 1) // source.chunk_size)
    ]
    jobs.reverse()
    out = {r: bytearray(size) for r, size in source.manifest.items()}

    async def worker() -> None:
        cs = source.chunk_size
        while jobs:
            r, i = jobs.pop()
            data = await source.fetch(r, i, priority)
            assert data == expected[r][i * cs : (i + 1) * cs], f"wrong bytes: {r} chunk {i}"
            out[r][i * cs : i * cs + len(data)] = data

    await asyncio.gather(*(worker() for _ in range(workers)))
    return {r: bytes(b) for r, b in out.items()}


def run(coro: Awaitable[Any], timeout: float = 30) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def raw_connect(
    port: int, version: int = wire.VERSION, token: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A hand-driven client: hello (+auth); returns reader, writer and our local port."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    local = writer.get_extra_info("sockname")[1]
    nonce = wire.new_nonce()
    writer.write(wire.ClientHello(version, nonce).encode())
    if version != wire.VERSION:
        return reader, writer, local
    kind, _, body = await wire.read_frame(reader)
    assert kind == MsgType.SERVER_HELLO
    hello = wire.ServerHello.decode(body)
    proof = wire.client_proof(token, hello.nonce, nonce) if token else b""
    writer.write(wire.frame(MsgType.AUTH, proof))
    kind, _, body = await wire.read_frame(reader)
    assert kind == MsgType.WELCOME, (kind, body)
    return reader, writer, local


async def read_error(reader: asyncio.StreamReader) -> int:
    """Skip answers until the ERROR frame; its code. The server closes right after."""
    while True:
        kind, _, body = await asyncio.wait_for(wire.read_frame(reader), 5)
        if kind == MsgType.ERROR:
            code, _ = wire.decode_error(body)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            return code


def records_for(caplog: pytest.LogCaptureFixture, port: int) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "drafter.server"
        and r.levelno >= logging.WARNING
        and f":{port}:" in r.getMessage()
    ]


async def one_line_logged(caplog: pytest.LogCaptureFixture, port: int) -> str:
    """Wait for the server's line about the client on ``port``; exactly one, no traceback."""
    deadline = time.monotonic() + 5
    while not records_for(caplog, port) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # a second line would come now
    found = records_for(caplog, port)
    assert len(found) == 1, [r.getMessage() for r in found]
    assert found[0].levelno == logging.WARNING
    assert found[0].exc_info is None
    return found[0].getMessage()


@pytest.fixture(scope="module")
def tls_files() -> Iterator[dict[str, Path]]:
    """Two self-signed certificates for 127.0.0.1: the server's and an unrelated one."""
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="drafter-tls-"))
    try:
        for name in ("server", "other"):
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec",
                 "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                 "-keyout", str(directory / f"{name}.key"),
                 "-out", str(directory / f"{name}.pem"),
                 "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                check=True, capture_output=True,
            )  # fmt: skip
        yield {
            "cert": directory / "server.pem",
            "key": directory / "server.key",
            "other": directory / "other.pem",
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- framing -------------------------------------------------------------------------


def test_oversized_frame_is_refused_before_its_body() -> None:
    async def go() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(wire.header(MsgType.CHUNK, wire.MAX_BODY + 1, 1))  # no body follows
        with pytest.raises(wire.ProtocolError, match="exceeds the limit"):
            await asyncio.wait_for(wire.read_frame(reader), 1)
        reader = asyncio.StreamReader()
        reader.feed_data(wire.frame(MsgType.ZERO, struct.pack(">I", 7), 42))
        assert await wire.read_frame(reader) == (MsgType.ZERO, 42, struct.pack(">I", 7))

    run(go())


# --- serving ------------------------------------------------------------------------


def test_pull_every_chunk_with_zero_markers(package: Path) -> None:
    expected = contents(package)
    zeros = zero_chunk_count(expected)
    assert zeros >= 40  # the memory and disk holes

    async def go() -> None:
        server = await start_server(package)
        source = RemoteSource(f"{LOOPBACK}:{server.port}")
        try:
            await source.connect()
            assert source.chunk_size == CHUNK
            assert source.config == open_package(package).read("config")
            assert list(source.manifest) == ["state", "memory", "kernel", "initramfs", "disk"]
            got = await pull(source, expected)
            assert got == expected
            # Every all-zero chunk came as a marker, every other one as bytes.
            assert source.zero_chunks == zeros
            assert server.stats.zero_chunks == zeros
            total = sum((len(b) + CHUNK - 1) // CHUNK for b in expected.values())
            assert server.stats.chunks == total - zeros
            # A demand fetch of a chunk works the same; bad requests are refused locally.
            assert await source.fetch("disk", 31, Priority.DEMAND) == expected["disk"][-CHUNK:]
            with pytest.raises(DrafterError, match="beyond the end"):
                await source.fetch("disk", 32)
            with pytest.raises(DrafterError, match="no-such"):
                await source.fetch("no-such", 0)
        finally:
            await source.close()
            await server.close()

    run(go())


def test_four_clients_at_once(package: Path) -> None:
    expected = contents(package)

    async def go() -> None:
        server = await start_server(package)
        sources = [RemoteSource(f"{LOOPBACK}:{server.port}") for _ in range(4)]
        try:
            await asyncio.gather(*(s.connect() for s in sources))
            results = await asyncio.gather(*(pull(s, expected) for s in sources))
            assert all(r == expected for r in results)
            assert server.stats.accepted == 4
        finally:
            for s in sources:
                await s.close()
            await server.close()

    run(go())


def test_demand_overtakes_queued_background_requests(package: Path) -> None:
    expected = contents(package)

    async def go() -> None:
        server = await start_server(package, delay=0.005)
        source = RemoteSource(f"{LOOPBACK}:{server.port}")
        try:
            await source.connect()
            finished: list[str] = []

            async def fetch(index: int, priority: Priority, tag: str) -> None:
                data = await source.fetch("memory", index, priority)
                assert data == expected["memory"][index * CHUNK : (index + 1) * CHUNK]
                finished.append(tag)

            background = [
                asyncio.create_task(fetch(i % 16, Priority.BACKGROUND, "bg")) for i in range(100)
            ]
            await asyncio.sleep(0.05)  # the server has them queued and is working through
            await fetch(60, Priority.DEMAND, "demand")
            before = finished.index("demand")
            await asyncio.gather(*background)
            assert before < 30, f"demand answered after {before} background chunks"
            assert server.stats.requests == {0: 1, 1: 100}
        finally:
            await source.close()
            await server.close()

    run(go())


# --- authentication and TLS ------------------------------------------------------------


def test_token_right_one_works_others_are_refused(
    package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = contents(package)
    token = "s3cret-token"

    async def go() -> None:
        server = await start_server(package, token=token)
        addr = f"{LOOPBACK}:{server.port}"
        try:
            for bad in (None, "wrong-token"):
                source = RemoteSource(addr, token=bad)
                with pytest.raises(DrafterError, match="refused the connection") as e:
                    await source.connect()
                assert "\n" not in str(e.value)
                await source.close()
            # A raw client that ignores the refusal gets nothing either.
            reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
            writer.write(wire.ClientHello(wire.VERSION, wire.new_nonce()).encode())
            kind, _, _ = await wire.read_frame(reader)
            assert kind == MsgType.SERVER_HELLO
            writer.write(wire.frame(MsgType.AUTH, bytes(32)))
            writer.write(wire.Request(0, 1, 0).encode(1))
            assert await read_error(reader) == ErrorCode.AUTH
            writer.close()
            assert server.stats.accepted == 0
            assert server.stats.chunks == server.stats.zero_chunks == 0
            assert server.stats.refused == 3
            # A client with a token does not trust a server that has none.
            open_server = await start_server(package)
            with pytest.raises(DrafterError, match="does not ask for a token"):
                await RemoteSource(f"{LOOPBACK}:{open_server.port}", token=token).connect()
            await open_server.close()
            # The right token works.
            good = RemoteSource(addr, token=token)
            await good.connect()
            assert await pull(good, expected) == expected
            await good.close()
        finally:
            await server.close()

    run(go())
    refusals = [r for r in caplog.records if r.name == "drafter.server" and "token" in r.message]
    assert len(refusals) >= 3
    assert all(r.exc_info is None for r in caplog.records)


def test_tls(package: Path, tls_files: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    expected = contents(package)

    async def go() -> None:
        tls = wire.server_ssl_context(tls_files["cert"], tls_files["key"])
        server = await start_server(package, ssl=tls)
        addr = f"{LOOPBACK}:{server.port}"
        try:
            # A plain-TCP client is refused; the server logs one line and keeps serving.
            plain = RemoteSource(addr)
            with pytest.raises(DrafterError, match="cannot connect"):
                await plain.connect()
            reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
            local = writer.get_extra_info("sockname")[1]
            writer.write(wire.ClientHello(wire.VERSION, wire.new_nonce()).encode())
            assert await asyncio.wait_for(reader.read(), 5) == b""  # nothing but the close
            writer.close()
            assert "TLS handshake failed" in await one_line_logged(caplog, local)
            # A client trusting another certificate refuses the server.
            other = RemoteSource(addr, tls_ca=str(tls_files["other"]))
            with pytest.raises(DrafterError, match="certificate"):
                await other.connect()
            # A client with the CA works, and so does a token on top of TLS.
            good = RemoteSource(addr, tls_ca=str(tls_files["cert"]))
            await good.connect()
            assert await pull(good, expected) == expected
            await good.close()
            assert server.stats.accepted == 1
        finally:
            await server.close()

    run(go())
    assert all(r.exc_info is None for r in caplog.records)


# --- hostile input ------------------------------------------------------------------


def test_hostile_clients_cost_one_line_each(
    package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = contents(package)

    async def go() -> None:
        server = await start_server(package, delay=0.001)
        port = server.port
        good = RemoteSource(f"{LOOPBACK}:{port}")
        await good.connect()
        done = asyncio.Event()

        async def keep_pulling() -> int:
            rounds = 0
            while not done.is_set() or rounds == 0:
                assert await pull(good, expected, workers=4) == expected
                rounds += 1
            return rounds

        puller = asyncio.create_task(keep_pulling())
        lines: dict[str, str] = {}
        try:
            # Random bytes.
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            local = writer.get_extra_info("sockname")[1]
            writer.write(random.Random(3).randbytes(4096))
            writer.write_eof()
            await asyncio.wait_for(reader.read(), 5)
            writer.close()
            lines["random"] = await one_line_logged(caplog, local)

            # A version this server does not speak.
            reader, writer, local = await raw_connect(port, version=99)
            assert await read_error(reader) == ErrorCode.VERSION
            writer.close()
            lines["version"] = await one_line_logged(caplog, local)

            # An oversized frame: refused from its header, the body is never sent.
            reader, writer, local = await raw_connect(port)
            writer.write(wire.header(MsgType.REQUEST, 64 * MIB, 1))
            assert await read_error(reader) == ErrorCode.PROTOCOL
            writer.close()
            lines["oversized"] = await one_line_logged(caplog, local)

            # A request beyond a resource's end.
            reader, writer, local = await raw_connect(port)
            writer.write(wire.Request(Priority.DEMAND, 4, 32).encode(1))  # disk has 32 chunks
            assert await read_error(reader) == ErrorCode.BAD_REQUEST
            writer.close()
            lines["beyond"] = await one_line_logged(caplog, local)

            # A connection dropped (reset) in the middle of a chunk.
            reader, writer, local = await raw_connect(port)
            for i in range(64):
                writer.write(wire.Request(Priority.DEMAND, 1, i % 16).encode(i + 1))
            await reader.readexactly(wire.HEADER_SIZE + 1000)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            lines["dropped"] = await one_line_logged(caplog, local)

            done.set()
            assert await asyncio.wait_for(puller, 20) >= 1
            # The server still serves newcomers.
            late = RemoteSource(f"{LOOPBACK}:{port}")
            await late.connect()
            assert await late.fetch("kernel", 4) == expected["kernel"][4 * CHUNK :]
            await late.close()
        finally:
            done.set()
            puller.cancel()
            with contextlib.suppress(BaseException):
                await puller
            await good.close()
            await server.close()
        assert "exceeds the limit" in lines["oversized"]
        assert "version 99" in lines["version"]
        assert "beyond its end" in lines["beyond"]
        assert good.reconnects == 0

    run(go())
    assert all(r.exc_info is None for r in caplog.records)
    assert not [r for r in caplog.records if r.name.startswith("asyncio")]


# --- the client across connection loss -----------------------------------------------


class CuttingProxy:
    """Forwards to ``port``; the first connection is cut after ``cut`` bytes downstream."""

    def __init__(self, port: int, cut: int) -> None:
        self.target = port
        self.cut = cut
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._on_client, LOOPBACK, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        limit = self.cut if self.connections == 1 else None
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, left: int | None):
            while data := await src.read(65536):
                if left is not None:
                    data = data[:left]
                    left -= len(data)
                dst.write(data)
                await dst.drain()
                if left == 0:
                    break

        with contextlib.suppress(Exception):
            await asyncio.wait(
                [
                    asyncio.create_task(pipe(reader, up_writer, None)),
                    asyncio.create_task(pipe(up_reader, writer, limit)),
                ],
                return_when=asyncio.FIRST_COMPLETED,
            )
        writer.transport.abort()
        up_writer.transport.abort()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_client_survives_a_connection_cut_mid_chunk(package: Path) -> None:
    expected = contents(package)

    async def go() -> None:
        server = await start_server(package)
        proxy = CuttingProxy(server.port, cut=200_000)  # inside the 4th chunk or so
        source = RemoteSource(f"{LOOPBACK}:{await proxy.start()}", retry_timeout=5)
        try:
            await source.connect()
            assert await pull(source, expected) == expected
            assert source.reconnects == 1 and proxy.connections == 2
        finally:
            await source.close()
            await proxy.close()
            await server.close()

    run(go())


def test_client_rides_out_a_server_restart_and_gives_up_later(package: Path) -> None:
    expected = contents(package)

    async def go() -> None:
        server = await start_server(package, delay=0.003)
        port = server.port
        source = RemoteSource(f"{LOOPBACK}:{port}", retry_timeout=2)
        await source.connect()
        try:
            # Stop the server mid-pull; bring it back on the same port within the window.
            pulling = asyncio.create_task(pull(source, expected, workers=4))
            await asyncio.sleep(0.2)
            assert not pulling.done()
            await server.close()
            await asyncio.sleep(0.5)
            server = await start_server(package, delay=0.003, port=port)
            assert await asyncio.wait_for(pulling, 20) == expected
            assert source.reconnects >= 1

            # Stop it again and leave it down: every pending and new fetch fails.
            pulling = asyncio.create_task(pull(source, expected, workers=4))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await server.close()
            with pytest.raises(DrafterError, match=f"lost the connection to 127.0.0.1:{port}"):
                await asyncio.wait_for(pulling, 10)
            assert 1.5 < time.monotonic() - started < 5
            with pytest.raises(DrafterError, match="lost the connection"):
                await source.fetch("state", 0, Priority.DEMAND)
        finally:
            await source.close()
            await server.close()

    run(go())


def test_connect_failures_are_one_line_errors(package: Path) -> None:
    async def go() -> None:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            free = s.getsockname()[1]
        with pytest.raises(DrafterError, match="cannot connect to 127.0.0.1"):
            await RemoteSource(f"{LOOPBACK}:{free}").connect()
        with pytest.raises(DrafterError, match="bad remote address"):
            RemoteSource("no-port-here")

    run(go())


# --- the command --------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_registry(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [command("drafter-registry"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        stop_process(proc)
        raise AssertionError(
            f"no serving line: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        )
    return proc, int(line.rsplit(":", 1)[1])


def test_registry_command(package: Path, workdir: Path) -> None:
    expected = contents(package)
    before = sha256(package)
    env = {k: v for k, v in os.environ.items() if k != wire.TOKEN_ENV}

    # Without a token: it serves, warns that the endpoint is open, exits 0 on Ctrl-C.
    proc, port = start_registry("--package-path", str(package), "--laddr", f"{LOOPBACK}:0",
                                env=env)  # fmt: skip
    try:

        async def go(token: str | None = None) -> None:
            source = RemoteSource(f"{LOOPBACK}:{port}", token=token)
            await source.connect()
            assert await pull(source, expected) == expected
            await source.close()

        run(go())
    finally:
        assert stop_process(proc, signal.SIGINT) == 0
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    assert "no token" in stderr and "Traceback" not in stderr

    # With a token file; the token itself never appears on the command line.
    token_file = workdir / "token"
    token_file.write_text("file-token\n")
    proc, port = start_registry("--package-path", str(package), "--laddr", f"{LOOPBACK}:0",
                                "--token-file", str(token_file), env=env)  # fmt: skip
    try:
        run(go("file-token"))
        with pytest.raises(DrafterError, match="refused"):
            run(go(None))
        # Address already in use.
        busy = run_command("drafter-registry", "--package-path", str(package),
                           "--laddr", f"{LOOPBACK}:{port}", env=env)  # fmt: skip
        assert_one_line_error(busy, "address already in use")
    finally:
        assert stop_process(proc, signal.SIGTERM) == 0
    assert "no token" not in (proc.stderr.read() if proc.stderr else "")
    assert sha256(package) == before

    garbage = workdir / "garbage.pem"
    garbage.write_text("not a certificate\n")
    base = ["--package-path", str(package), "--laddr", f"{LOOPBACK}:0"]
    for args, needle in (
        (["--package-path", str(workdir / "missing.drft"), "--laddr", f"{LOOPBACK}:0"],
         "does not exist"),
        (["--package-path", str(garbage), "--laddr", f"{LOOPBACK}:0"], "not a readable"),
        ([*base[:2], "--laddr", "nonsense"], "bad --laddr"),
        ([*base, "--token-file", str(workdir / "no-token")], "token file"),
        ([*base, "--tls-cert", str(garbage), "--tls-key", str(garbage)], "TLS certificate"),
        ([*base, "--tls-cert", str(workdir / "no.pem"), "--tls-key", str(garbage)],
         "does not exist"),
        ([*base, "--tls-cert", str(garbage)], "go together"),
    ):  # fmt: skip
        assert_one_line_error(run_command("drafter-registry", *args, env=env, timeout=30), needle)
    assert sha256(package) == before
