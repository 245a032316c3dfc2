"""The wire protocol (v2) over real loopback sockets: registry provider, chunk server,
client. No QEMU: the package is synthetic (tests/support/wire.py).

Every chunk a client returns is checked against the package's bytes, so a torn or
misplaced chunk fails the test wherever it happens. Attacks on purpose are in
tests/unit/test_wire_hostile.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drafter.errors import DrafterError
from drafter.hashes import chunk_hash
from drafter.package import RESOURCES, PackageConfig, Source, open_package, write_package
from drafter.transport import localtoken, security
from drafter.transport import protocol as wire
from drafter.transport.channel import FrameProtocol
from drafter.transport.client import Priority, RemoteSource
from drafter.transport.protocol import ErrorCode, MsgType, RemoteError
from drafter.transport.registry import PackageProvider
from support.common import assert_one_line_error, run_command
from support.wire import (
    CHUNK,
    LOOPBACK,
    MIB,
    SlowProvider,
    build_package,
    contents,
    data_chunks,
    env_without_token,
    one_line_logged,
    pull,
    raw_connect,
    run,
    start_registry,
    start_server,
    zero_chunk_count,
)

TOKEN = security.new_token()


@pytest.fixture
def package(workdir: Path) -> Path:
    return build_package(workdir)


@pytest.fixture(scope="module")
def tls_files() -> Iterator[dict[str, Path]]:
    """Two self-signed certificates for 127.0.0.1: the server's and an unrelated one."""
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


def feed(proto: FrameProtocol, data: bytes) -> None:
    """Hand ``data`` to a frame parser as if it came from the socket."""
    while data:
        view = proto.get_buffer(len(data))
        n = min(len(view), len(data))
        view[:n] = data[:n]
        proto.buffer_updated(n)
        data = data[n:]


def test_frame_limits_apply_before_the_body() -> None:
    async def go() -> None:
        # A declared length above the limit is refused from the header alone.
        with pytest.raises(wire.ProtocolError, match="exceeds the limit"):
            wire.parse_header(wire.header(MsgType.CHUNK, wire.MAX_BODY + 1, 1), wire.MAX_BODY)
        with pytest.raises(wire.ProtocolError, match="malformed frame header"):
            wire.parse_header(wire.header(MsgType.PING, 0, 1, flags=1), wire.MAX_BODY)
        # Before the proof, the parser takes only small frames: a 2 KiB hello is refused
        # as soon as its header is in, without waiting for (or keeping) the body.
        proto = FrameProtocol()
        feed(proto, wire.header(MsgType.CLIENT_HELLO, 2048))
        with pytest.raises(wire.ProtocolError, match="exceeds the limit of 1024"):
            await asyncio.wait_for(proto.next_frame(), 1)
        # A good frame comes through whole, also when it arrives byte by byte.
        proto = FrameProtocol()
        for byte in wire.frame(MsgType.PING, b"", 42) + wire.frame(MsgType.PING, b"abc", 7):
            feed(proto, bytes([byte]))
        head, body, tag = await asyncio.wait_for(proto.next_frame(), 1)
        assert wire.parse_header(head, 0) == (0, MsgType.PING, 42) and body == tag == b""
        head, body, _ = await asyncio.wait_for(proto.next_frame(), 1)
        assert wire.parse_header(head, 3) == (3, MsgType.PING, 7) and body == b"abc"

    run(go())


# --- serving ------------------------------------------------------------------------


def test_pull_every_chunk_zero_chunks_never_requested(package: Path) -> None:
    expected = contents(package)
    zeros = zero_chunk_count(expected)
    assert zeros >= 40  # the memory and disk holes
    total = sum((len(b) + CHUNK - 1) // CHUNK for b in expected.values())

    async def go() -> None:
        server = await start_server(package)
        source = RemoteSource(f"{LOOPBACK}:{server.port}")
        try:
            await source.connect()
            assert source.chunk_size == CHUNK
            assert source.config == open_package(package).read("config")
            assert list(source.manifest) == ["state", "memory", "kernel", "initramfs", "disk"]
            # The hash list: BLAKE3 of every chunk, 32 zero bytes for an all-zero one.
            for r, blob in expected.items():
                assert source.hashes[r] == [
                    chunk_hash(blob[i : i + CHUNK]) for i in range(0, len(blob), CHUNK)
                ]
            assert source.hashes["memory"][40] == wire.ZERO_HASH
            assert source.hot == {"memory": [0, 56]}
            got = await pull(source, expected)
            assert got == expected
            # Zero chunks were known from the hash list: never requested, never sent.
            assert source.zero_chunks == zeros
            assert server.stats.zero_chunks == 0
            assert server.stats.chunks == total - zeros
            assert sum(server.stats.requests.values()) == total - zeros
            assert source.stats.chunks == total - zeros
            # A demand fetch of a chunk works the same; bad requests are refused locally.
            assert await source.fetch("disk", 31, Priority.DEMAND) == expected["disk"][-CHUNK:]
            assert server.stats.requests[Priority.DEMAND] == 1
            data, digest = await source.fetch_chunk("kernel", 4, Priority.DEMAND)
            assert data == expected["kernel"][4 * CHUNK :]
            assert digest == chunk_hash(data)
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
            assert server.stats.chunks == 4 * len(data_chunks(expected))
        finally:
            for s in sources:
                await s.close()
            await server.close()

    run(go())


def test_clients_connecting_at_once_share_one_hashing_run(package: Path) -> None:
    """The first clients of a registry that has not hashed its package yet all wait
    for the same run, and none sees a half-filled table."""
    expected = contents(package)

    async def go() -> None:
        provider = PackageProvider(open_package(package), CHUNK)
        runs = []
        hash_all = provider.hash_all
        provider.hash_all = lambda: (runs.append(1), hash_all())  # type: ignore[method-assign]
        names = list(provider.manifest())
        asked = [name for name in reversed(names) for _ in range(3)]
        got = await asyncio.gather(*(provider.hashes(name) for name in asked))
        for name, hashes in zip(asked, got, strict=True):
            blob = expected[name]
            assert hashes == [chunk_hash(blob[i : i + CHUNK]) for i in range(0, len(blob), CHUNK)]
        assert len(runs) == 1

    run(go())


def test_demand_overtakes_queued_background_requests(package: Path) -> None:
    expected = contents(package)

    async def go() -> None:
        server = await start_server(package, delay=0.005)
        source = RemoteSource(f"{LOOPBACK}:{server.port}")
        try:
            await source.connect()
            assert source.hashes["memory"][57] != wire.ZERO_HASH  # a chunk it must send
            finished: list[str] = []

            async def fetch(index: int, priority: Priority, tag: str) -> None:
                data = await source.fetch("memory", index, priority)
                assert data == expected["memory"][index * CHUNK : (index + 1) * CHUNK]
                finished.append(tag)

            background = [
                asyncio.create_task(fetch(i % 16, Priority.BACKGROUND, "bg")) for i in range(100)
            ]
            await asyncio.sleep(0.05)  # the server has them queued and is working through
            await fetch(57, Priority.DEMAND, "demand")
            before = finished.index("demand")
            await asyncio.gather(*background)
            assert before < 30, f"demand answered after {before} background chunks"
            assert server.stats.requests[Priority.DEMAND] == 1
            assert server.stats.requests[Priority.BACKGROUND] == 100
        finally:
            await source.close()
            await server.close()

    run(go())


# --- authentication and TLS ------------------------------------------------------------


def test_token_right_one_works_others_are_refused(
    package: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = contents(package)

    async def go() -> None:
        server = await start_server(package, token=TOKEN)
        addr = f"{LOOPBACK}:{server.port}"
        try:
            # A client without a token (nor a host-local one) is told so before it
            # sends anything.
            with monkeypatch.context() as m:
                m.setenv(localtoken.LOCAL_TOKEN_ENV, "/nonexistent/drafter/local-token")
                with pytest.raises(DrafterError, match="requires a token") as e:
                    await RemoteSource(addr).connect()
            assert "\n" not in str(e.value) and "drafter-token" in str(e.value)
            # The host-local token is never sent to a server with a token of its own.
            localtoken.for_serving()
            with pytest.raises(DrafterError, match="requires a token") as e:
                await RemoteSource(addr).connect()
            assert "cannot read" not in str(e.value)
            # A wrong token: the server refuses the proof, in one line.
            wrong = RemoteSource(addr, token=security.new_token())
            with pytest.raises(DrafterError, match="refused the connection") as e:
                await wrong.connect()
            assert "wrong or missing token" in str(e.value) and "\n" not in str(e.value)
            await wrong.close()
            # A raw client that ignores the refusal and asks for a chunk gets nothing.
            raw = await raw_connect(server.port, greet=False)  # an all-zero proof
            raw.request(1, 0, 1)
            code, _ = await raw.read_error(sealed=False)
            assert code == ErrorCode.AUTH
            raw.abort()
            assert server.stats.accepted == 0
            assert server.stats.chunks == server.stats.zero_chunks == 0
            # Refused: the two clients without a token (they left after the hello), the
            # wrong token, the raw client; only the last two sent a proof.
            assert server.stats.refused == 4
            assert server.stats.auth_failures == 2
            # A client with a token does not trust a server that has none.
            open_server = await start_server(package)
            with pytest.raises(DrafterError, match="does not ask for a token"):
                await RemoteSource(f"{LOOPBACK}:{open_server.port}", token=TOKEN).connect()
            await open_server.close()
            # The right token works; every frame after the hellos is sealed (the raw
            # client checks each seal).
            good = RemoteSource(addr, token=TOKEN)
            await good.connect()
            assert await pull(good, expected) == expected
            await good.close()
            raw = await raw_connect(server.port, token=TOKEN)
            raw.request(2, 1, 9)
            kind, request_id, body = await raw.read()
            assert (kind, request_id) == (MsgType.CHUNK, 9)
            assert body[wire.CHUNK_FIXED :] == expected["kernel"][CHUNK : 2 * CHUNK]
            raw.abort()
        finally:
            await server.close()

    run(go())
    refusals = [r for r in caplog.records if r.name.endswith("server") and "token" in r.message]
    assert len(refusals) == 2
    assert all(r.exc_info is None for r in caplog.records)


def test_only_tokens_drafter_token_makes_are_accepted() -> None:
    assert security.check_token(TOKEN, "the test") == TOKEN
    assert security.new_token() != TOKEN and len(TOKEN) == security.TOKEN_CHARS
    # One changed character, one cut off, a lookalike without the check, the older
    # form (43 URL-safe characters): none passes.
    other = "A" if TOKEN[-1] != "A" else "B"
    older = security.new_token()[len(security.TOKEN_PREFIX) :][:43]
    for bad in (TOKEN[:-1] + other, TOKEN[:-1], security.TOKEN_PREFIX + "a" * 48, older):
        with pytest.raises(DrafterError, match="not one `drafter-token` makes"):
            security.check_token(bad, "the test")


def test_tls(package: Path, tls_files: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    expected = contents(package)

    async def go() -> None:
        tls = security.server_ssl_context(tls_files["cert"], tls_files["key"])
        server = await start_server(package, ssl=tls)
        addr = f"{LOOPBACK}:{server.port}"
        try:
            # A plain-TCP client is refused; the server logs one line and keeps serving.
            plain = RemoteSource(addr)
            with pytest.raises(DrafterError, match="cannot connect.*TLS"):
                await plain.connect()
            reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
            local = writer.get_extra_info("sockname")[1]
            hello = wire.Hello(wire.VERSION, 0, security.new_nonce()).body()
            writer.write(wire.frame(MsgType.CLIENT_HELLO, hello))
            assert await asyncio.wait_for(reader.read(), 5) == b""  # nothing but the close
            writer.close()
            assert "TLS handshake failed" in await one_line_logged(caplog, local)
            # A client trusting another certificate refuses the server.
            other = RemoteSource(addr, tls_ca=str(tls_files["other"]))
            with pytest.raises(DrafterError, match="certificate"):
                await other.connect()
            # A client with the CA works.
            good = RemoteSource(addr, tls_ca=str(tls_files["cert"]))
            await good.connect()
            assert await pull(good, expected) == expected
            await good.close()
            assert server.stats.accepted == 1
        finally:
            await server.close()
        # A token on top of TLS (the frames are not sealed then: TLS protects them).
        server = await start_server(package, ssl=tls, token=TOKEN)
        try:
            good = RemoteSource(f"{LOOPBACK}:{server.port}", token=TOKEN,
                                tls_ca=str(tls_files["cert"]))  # fmt: skip
            await good.connect()
            assert await pull(good, expected) == expected
            await good.close()
            wrong = RemoteSource(f"{LOOPBACK}:{server.port}", token=security.new_token(),
                                 tls_ca=str(tls_files["cert"]))  # fmt: skip
            with pytest.raises(DrafterError, match="wrong or missing token"):
                await wrong.connect()
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
            raw = await raw_connect(port, version=99)
            assert (await raw.read_error())[0] == ErrorCode.VERSION
            raw.abort()
            lines["version"] = await one_line_logged(caplog, raw.local)

            # An oversized frame: refused from its header, the body is never sent.
            raw = await raw_connect(port)
            raw.writer.write(wire.header(MsgType.REQUEST, 64 * MIB, 1))
            assert (await raw.read_error())[0] == ErrorCode.PROTOCOL
            raw.abort()
            lines["oversized"] = await one_line_logged(caplog, raw.local)

            # A request beyond a resource's end, and a run that reaches beyond it.
            for index, count in ((32, 1), (30, 3)):  # the disk has 32 chunks
                raw = await raw_connect(port)
                raw.request(4, index, 1, count)
                assert (await raw.read_error())[0] == ErrorCode.BAD_REQUEST
                raw.abort()
                lines[f"beyond {count}"] = await one_line_logged(caplog, raw.local)

            # A run longer than the protocol allows.
            raw = await raw_connect(port)
            raw.request(1, 0, 1, wire.MAX_RUN + 1)
            assert (await raw.read_error())[0] == ErrorCode.BAD_REQUEST
            raw.abort()
            lines["long run"] = await one_line_logged(caplog, raw.local)

            # A connection dropped (reset) in the middle of a chunk.
            raw = await raw_connect(port)
            for i in range(64):
                raw.request(1, i % 16, i + 1)
            await raw.reader.readexactly(wire.HEADER_SIZE + 1000)
            sock = raw.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.abort()
            lines["dropped"] = await one_line_logged(caplog, raw.local)

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
        assert "beyond its end" in lines["beyond 1"] and "beyond its end" in lines["beyond 3"]
        assert "65 chunks" in lines["long run"]
        assert good.reconnects == 0

    run(go())
    assert all(r.exc_info is None for r in caplog.records)
    assert not [r for r in caplog.records if r.name.startswith("asyncio")]


def test_a_version_1_client_gets_a_clear_version_error(
    package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a v1 client (drafter before the v2 rewrite) sends first: the same frame
    layout with version 1. It must hear, in the framing it understands, why."""

    async def go() -> None:
        server = await start_server(package, token=TOKEN)
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
            local = writer.get_extra_info("sockname")[1]
            v1_hello = struct.pack(">4sHH", b"DRFT", 1, 0) + security.new_nonce()
            writer.write(struct.pack(">IB3xI", len(v1_hello), 1, 0) + v1_hello)
            # v1 framing: u32 length, u8 type, 3 zero bytes, u32 request id.
            head = await asyncio.wait_for(reader.readexactly(12), 5)
            length, kind, request_id = struct.unpack(">IB3xI", head)
            assert head[5:8] == b"\0\0\0"
            body = await reader.readexactly(length)
            assert kind == MsgType.ERROR  # 8 in v1 too
            code, text = wire.decode_error(body)
            assert code == ErrorCode.VERSION  # 2 in v1 too
            assert "protocol version 1 is not supported" in text
            assert "version 2" in text and "upgrade" in text
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            assert "version 1" in await one_line_logged(caplog, local)
            assert server.stats.auth_failures == 0
        finally:
            await server.close()

    run(go())


def test_a_v2_client_of_a_v1_server_says_which_versions(package: Path) -> None:
    """A v1 server answered a hello with its own: version 1, a nonce and a proof."""

    async def v1_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(12)
        body = struct.pack(">4sHH", b"DRFT", 1, 1) + bytes(64)
        writer.write(struct.pack(">IB3xI", len(body), 2, 0) + body)
        await writer.drain()
        await asyncio.sleep(5)

    async def go() -> None:
        fake = await asyncio.start_server(v1_server, LOOPBACK, 0)
        port = fake.sockets[0].getsockname()[1]
        try:
            with pytest.raises(DrafterError, match="version 1 is not supported") as e:
                await asyncio.wait_for(RemoteSource(f"{LOOPBACK}:{port}").connect(), 3)
            assert "\n" not in str(e.value)
        finally:
            fake.close()

    run(go())


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


@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "sealed"])
def test_client_survives_a_connection_cut_mid_chunk(package: Path, token: str | None) -> None:
    expected = contents(package)

    async def go() -> None:
        server = await start_server(package, token=token)
        proxy = CuttingProxy(server.port, cut=200_000)  # inside the 4th chunk or so
        source = RemoteSource(f"{LOOPBACK}:{await proxy.start()}", token=token, retry_timeout=5)
        try:
            await source.connect()
            assert await pull(source, expected) == expected
            assert source.reconnects == 1 and proxy.connections == 2
            assert source.stats.verify_failures == 0
        finally:
            await source.close()
            await proxy.close()
            await server.close()

    run(go())


def test_client_rides_out_a_server_restart_and_gives_up_later(package: Path) -> None:
    expected = contents(package)

    async def go() -> None:
        server = await start_server(package, delay=0.01)
        port = server.port
        source = RemoteSource(f"{LOOPBACK}:{port}", retry_timeout=2)
        await source.connect()
        try:
            # Stop the server mid-pull; bring it back on the same port within the window.
            pulling = asyncio.create_task(pull(source, expected, workers=4))
            await asyncio.sleep(0.1)
            assert not pulling.done()
            await server.close()
            await asyncio.sleep(0.5)
            server = await start_server(package, delay=0.01, port=port)
            assert await asyncio.wait_for(pulling, 20) == expected
            assert source.reconnects >= 1

            # Stop it again and leave it down: every pending and new fetch fails.
            pulling = asyncio.create_task(pull(source, expected, workers=4))
            await asyncio.sleep(0.1)
            assert not pulling.done()
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


def test_registry_command(package: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = contents(package)
    before = sha256(package)
    env = env_without_token()

    async def go(port: int, token: str | None = None) -> None:
        source = RemoteSource(f"{LOOPBACK}:{port}", token=token)
        await source.connect()
        assert await pull(source, expected) == expected
        await source.close()

    # Without a token: it serves on loopback to the accounts that can read the
    # host-local token (this one: the client finds it alone), and to no one else (a
    # client whose host-local token is another); exits 0 on Ctrl-C.
    reg = start_registry("--package-path", str(package), "--laddr", f"{LOOPBACK}:0",
                         env=env, stderr_path=workdir / "local.err")  # fmt: skip
    try:
        run(go(reg.port))
        with monkeypatch.context() as m:
            m.setenv(localtoken.LOCAL_TOKEN_ENV, str(workdir / "elsewhere" / "local-token"))
            localtoken.for_serving()  # another account's own host-local token
            with pytest.raises(RemoteError, match="refused the connection"):
                run(go(reg.port))
            m.setenv(localtoken.LOCAL_TOKEN_ENV, str(workdir / "missing" / "local-token"))
            with pytest.raises(DrafterError, match="requires a token .this user cannot read"):
                run(go(reg.port))
    finally:
        assert reg.stop(signal.SIGINT) == 0
    stderr = reg.stderr()
    assert "no token" not in stderr and "Traceback" not in stderr

    # --insecure: anyone who can connect reads it, and it says so.
    reg = start_registry("--package-path", str(package), "--laddr", f"{LOOPBACK}:0",
                         "--insecure", env=env, stderr_path=workdir / "open.err")  # fmt: skip
    try:
        with monkeypatch.context() as m:
            m.setenv(localtoken.LOCAL_TOKEN_ENV, str(workdir / "missing" / "local-token"))
            run(go(reg.port))
    finally:
        assert reg.stop(signal.SIGINT) == 0
    assert "no token" in reg.stderr()

    # With a token file; the token itself never appears on the command line.
    token_file = workdir / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    reg = start_registry("--package-path", str(package), "--laddr", f"{LOOPBACK}:0",
                         "--token-file", str(token_file), env=env,
                         stderr_path=workdir / "token.err")  # fmt: skip
    try:
        run(go(reg.port, TOKEN))
        # No token given: the host-local one is not offered to a server with its own.
        with pytest.raises(DrafterError, match="requires a token"):
            run(go(reg.port, None))
        # Address already in use.
        busy = run_command("drafter-registry", "--package-path", str(package),
                           "--laddr", f"{LOOPBACK}:{reg.port}", env=env)  # fmt: skip
        assert_one_line_error(busy, "address already in use")
    finally:
        assert reg.stop(signal.SIGTERM) == 0
    assert "no token" not in reg.stderr() and TOKEN not in reg.stderr()
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
        ([*base, "--tls-cert", str(garbage)], "--tls-cert needs --tls-key"),
        ([*base, "--chunk-size", "1000"], "--chunk-size"),
    ):  # fmt: skip
        assert_one_line_error(run_command("drafter-registry", *args, env=env, timeout=30), needle)
    assert sha256(package) == before


@pytest.mark.slow
def test_thousands_of_requests_at_once_stay_under_the_servers_limit(workdir: Path) -> None:
    """A client asked for far more chunks at once than a connection may have outstanding
    (as a peer's hot set can be, at small chunk sizes): it paces its requests, every
    priority together, and the server never answers TOO_MANY."""
    files: dict[str, Source | Path] = {}
    for name in RESOURCES[1:]:
        files[name] = workdir / name
        files[name].write_bytes(os.urandom(8 * MIB if name == "memory" else 4096))
    pkg = workdir / "dense.drft"
    write_package(pkg, PackageConfig(8, 1, "console=ttyS0", "02:00:00:00:00:01"), files)
    memory = (workdir / "memory").read_bytes()
    small = 4096

    async def go() -> None:
        provider = PackageProvider(open_package(pkg), small)
        # A slow server, so that requests pile up there.
        server = await start_server(pkg, provider=SlowProvider(provider, 0.0002))
        source = RemoteSource(f"{LOOPBACK}:{server.port}")
        try:
            await source.connect()
            jobs = [
                (i, priority)
                for i in range(source.chunks("memory"))
                for priority in (Priority.PREFETCH, Priority.DEMAND, Priority.BACKGROUND)
            ]
            assert len(jobs) > 4 * wire.MAX_OUTSTANDING

            async def one(i: int, priority: Priority) -> None:
                data = await source.fetch("memory", i, priority)
                assert data == memory[i * small : (i + 1) * small]

            await asyncio.gather(*(one(*job) for job in jobs))
        finally:
            await source.close()
            await server.close()
            provider.close()

    run(go(), timeout=120)
