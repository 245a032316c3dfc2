"""Attacks on the wire protocol (v2), each against the protection meant to stop it.

Every test here fails if its protection is removed. Where a server is attacked, a
well-behaved client pulls everything during the attack and must not be much slower
than without it; where memory matters, drafter-registry runs as a process and its
resident memory is read from /proc. No QEMU: the package is synthetic.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drafter.errors import DrafterError
from drafter.package import open_package
from drafter.transport import protocol as wire
from drafter.transport import security
from drafter.transport.client import RemoteSource, VerificationError
from drafter.transport.hashes import digest
from drafter.transport.protocol import ErrorCode, MsgType
from drafter.transport.registry import PackageProvider
from drafter.transport.server import ServerLimits
from support.common import assert_one_line_error, run_command
from support.net import free_port, nothing_listens
from support.wire import (
    CHUNK,
    LOOPBACK,
    MIB,
    FrameProxy,
    Raw,
    WrappedProvider,
    build_package,
    contents,
    data_chunks,
    data_requests,
    env_without_token,
    one_line_logged,
    pull,
    raw_connect,
    raw_open,
    read_header,
    records_for,
    run,
    start_registry,
    start_server,
    timed_pull,
)

TOKEN = security.new_token()
SERVER_LOG = "drafter.transport.server"


@pytest.fixture
def package(workdir: Path) -> Path:
    return build_package(workdir)


@pytest.fixture
def token_file(workdir: Path) -> Path:
    path = workdir / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def fast_enough(attacked: float, normal: float) -> bool:
    """A well-behaved client under attack: at most 3 times slower, plus a second."""
    return attacked < 3 * normal + 1


def one_line(error: BaseException) -> str:
    text = str(error)
    assert text and "\n" not in text and "\r" not in text and len(text) < 5000, text
    return text


async def until_idle(cpu_seconds: Callable[[], float], timeout: float = 20) -> float:
    """Wait until a process uses (almost) no CPU over 0.2 s; the seconds it took.
    Fails the test if it does not calm down within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = cpu_seconds()
        await asyncio.sleep(0.2)
        if cpu_seconds() - before < 0.03:
            return time.monotonic() - started
    raise AssertionError(f"still busy after {timeout:g} s")


async def fetch_all(
    source: RemoteSource, expected: dict[str, bytes], times: int = 20
) -> list[BaseException]:
    """Fetch every chunk a client would request ``times`` over, all at once (more than
    the window holds: some wait for room). Bytes that come back must be the right ones;
    returns the errors. Every fetch ends: none is left waiting."""
    jobs = data_chunks(expected) * times
    results = await asyncio.wait_for(
        asyncio.gather(*(source.fetch(r, i) for r, i in jobs), return_exceptions=True), 10
    )
    errors = []
    for (r, i), result in zip(jobs, results, strict=True):
        if isinstance(result, BaseException):
            errors.append(result)
        else:
            assert bytes(result) == expected[r][i * CHUNK : (i + 1) * CHUNK], f"{r} {i}"
    return errors


# --- no offline guessing ------------------------------------------------------------


def test_nothing_before_the_proof_depends_on_the_token(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client without the token learns nothing it could test guesses against: what
    the server sends before the client's proof checks is the same for every token."""
    choice = bytes(2)

    async def transcript(port: int, nonce: bytes, guess: str | None) -> tuple[bytes, bytes, bytes]:
        """(client hello, server hello, all the server sent after its hello) for a
        client proving with ``guess`` (all zeros for None)."""
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        client_hello = wire.Hello(wire.VERSION, wire.HELLO_TOKEN, nonce).body()
        writer.write(wire.frame(MsgType.CLIENT_HELLO, client_hello))
        length, kind, _ = read_header(await reader.readexactly(wire.HEADER_SIZE))
        assert kind == MsgType.SERVER_HELLO
        server_hello = await reader.readexactly(length)
        proof = bytes(wire.PROOF_SIZE)
        if guess is not None:
            proof = security.client_proof(guess, client_hello, server_hello + choice)
        writer.write(wire.frame(MsgType.AUTH, proof + choice))
        # Everything up to the refusal (and the close), or up to the hot list.
        rest = b""
        async with asyncio.timeout(5):
            while True:
                head = await reader.readexactly(wire.HEADER_SIZE)
                length, kind, _ = read_header(head)
                rest += head + await reader.readexactly(length)
                if kind == MsgType.ERROR:
                    writer.write_eof()
                    rest += await reader.read()
                    break
                rest += await reader.readexactly(security.TAG_SIZE)
                if kind == MsgType.HOT:
                    break
        writer.close()
        return client_hello, server_hello, rest

    candidates = [security.new_token() for _ in range(200)] + [TOKEN]
    random.Random(5).shuffle(candidates)

    def verifies(candidate: str, seen: tuple[bytes, bytes, bytes]) -> bool:
        """Whether what a server sent can be checked against ``candidate``: one of the
        token's proofs appears in it, or its first frame carries the token's seal."""
        client_hello, server_hello, rest = seen
        sent = server_hello + rest
        for proof in (security.client_proof, security.server_proof):
            for hello in (server_hello, server_hello + choice):
                if proof(candidate, client_hello, hello) in sent:
                    return True
        if len(rest) >= wire.HEADER_SIZE:
            length = read_header(rest[: wire.HEADER_SIZE])[0]
            head, body = rest[: wire.HEADER_SIZE], rest[wire.HEADER_SIZE :][:length]
            tag = rest[wire.HEADER_SIZE + length :][: security.TAG_SIZE]
            _, s2c = security.seals(candidate, client_hello, server_hello)
            if len(tag) == security.TAG_SIZE and s2c.check(head, body, tag):
                return True
        return False

    async def go() -> None:
        a = await start_server(package, token=TOKEN)
        b = await start_server(package, token=security.new_token())
        try:
            # Real nonces: the same length and structure; only the nonce differs.
            seen_a = await transcript(a.port, security.new_nonce(), "a guess " * 5)
            seen_b = await transcript(b.port, security.new_nonce(), "a guess " * 5)
            hello_a, hello_b = seen_a[1], seen_b[1]
            assert len(hello_a) == len(hello_b) == 8 + wire.NONCE_SIZE
            assert hello_a[:8] == hello_b[:8]
            assert wire.Hello.decode(hello_a, "server").flags & wire.HELLO_TOKEN
            assert hello_a[8:] != hello_b[8:]
            # A dictionary (with the right token in it) against a refused attempt:
            # nothing to check a candidate against, so none stands out.
            for guess in ("a guess " * 5, None):
                seen = await transcript(a.port, security.new_nonce(), guess)
                assert seen[2][4] == MsgType.ERROR  # the refusal, nothing else
                assert [c for c in candidates if verifies(c, seen)] == []
            # The same check does single the token out once the server answers a right
            # proof (it proves itself then): the silence above is not the check's.
            seen = await transcript(a.port, security.new_nonce(), TOKEN)
            assert [c for c in candidates if verifies(c, seen)] == [TOKEN]

            # With the nonces fixed, servers with different tokens send byte for byte
            # the same, up to the refusal: nothing in it is derived from the token.
            fixed = bytes(range(32))
            monkeypatch.setattr(security, "new_nonce", lambda: fixed)
            for guess in ("a guess " * 5, None):
                assert await transcript(a.port, fixed, guess) == await transcript(
                    b.port, fixed, guess
                )
            assert a.stats.accepted == 1 and a.stats.auth_failures == 5
        finally:
            await a.close()
            await b.close()

    run(go())


# --- frames changed in flight --------------------------------------------------------


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.mark.parametrize("where", ["payload", "fixed part", "header"])
def test_a_byte_changed_in_a_chunk_frame_is_refused(package: Path, where: str) -> None:
    """Token set, no TLS. A changed payload fails the chunk's hash (VerificationError);
    a changed header or fixed part (which holds the hash) fails the frame's seal."""
    expected = contents(package)

    def down(n: int, kind: int, head: bytes, body: bytes, tag: bytes) -> bytes:
        if kind == MsgType.CHUNK:
            down.chunks += 1  # type: ignore[attr-defined]
            if down.chunks == 3:  # type: ignore[attr-defined]
                if where == "payload":
                    body = flip(body, wire.CHUNK_FIXED + 1000)
                elif where == "fixed part":
                    body = flip(body, wire.CHUNK_FIXED - 1)  # the last byte of the hash
                else:
                    head = flip(head, 11)  # the request id
        return head + body + tag

    down.chunks = 0  # type: ignore[attr-defined]

    async def go() -> None:
        server = await start_server(package, token=TOKEN)
        proxy = FrameProxy(server.port, sealed=True, down=down)
        source = RemoteSource(f"{LOOPBACK}:{await proxy.start()}", token=TOKEN, retry_timeout=3)
        try:
            await source.connect()
            errors = await fetch_all(source, expected)  # right bytes or an error, each
            assert errors
            text = one_line(errors[0])
            assert all(str(e) == text for e in errors)
            if where == "payload":
                # Those waiting for it fail with it; those that came later, with its text.
                assert isinstance(errors[0], VerificationError)
                assert "failed verification" in text
                assert source.stats.verify_failures == 1
            else:
                assert not any(isinstance(e, VerificationError) for e in errors)
                assert "failed authentication" in text
            # The client gave up for good, with the same one line.
            with pytest.raises(DrafterError) as later:
                await source.fetch("kernel", 0)
            assert one_line(later.value) == text
            assert source.reconnects == 0
        finally:
            await source.close()
            await proxy.close()
            await server.close()

    run(go())


@pytest.mark.parametrize("attack", ["inject down", "replay down", "drop down", "inject up"])
def test_frames_injected_replayed_or_dropped_fail_authentication(
    package: Path, attack: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Token set, no TLS: every frame after the hellos is sealed with a sequence
    number, so a frame added, repeated or removed in flight is noticed."""
    expected = contents(package)
    seen = {"chunks": 0, "up": 0}

    def down(n: int, kind: int, head: bytes, body: bytes, tag: bytes) -> bytes:
        frame = head + body + tag
        if kind != MsgType.CHUNK:
            return frame
        seen["chunks"] += 1
        if seen["chunks"] != 2:
            return frame
        if attack == "inject down":
            return frame + wire.header(MsgType.PING, 0, 77) + os.urandom(security.TAG_SIZE)
        if attack == "replay down":
            return frame + frame
        if attack == "drop down":
            return b""
        return frame

    def up(n: int, kind: int, head: bytes, body: bytes, tag: bytes) -> bytes:
        frame = head + body + tag
        if attack == "inject up" and n == 2:  # after the client's first sealed frame
            forged = wire.Request(0, 2, 0).body()
            frame += wire.header(MsgType.REQUEST, len(forged), 4242) + forged
            frame += os.urandom(security.TAG_SIZE)
        return frame

    async def go() -> None:
        server = await start_server(package, token=TOKEN)
        proxy = FrameProxy(server.port, sealed=True, down=down, up=up)
        source = RemoteSource(f"{LOOPBACK}:{await proxy.start()}", token=TOKEN, retry_timeout=3)
        try:
            await source.connect()
            errors = await fetch_all(source, expected)
            assert errors
            assert "failed authentication" in one_line(errors[0])
            assert source.reconnects == 0
            if attack == "inject up":
                assert server.stats.auth_failures == 1
                assert "reported an error" in str(errors[0])  # the server's word for it
        finally:
            await source.close()
            await proxy.close()
            await server.close()

    run(go())
    if attack == "inject up":
        lines = [r.getMessage() for r in caplog.records if r.name == SERVER_LOG]
        assert len([ln for ln in lines if "failed authentication" in ln]) == 1, lines


class LyingProvider(WrappedProvider):
    """Serves the package's true hash list, but wrong bytes (of the right length) for
    one chunk, with no hash: the server hashes the wrong bytes itself, so the chunk's
    own hash matches them."""

    def __init__(self, inner: PackageProvider, resource: str, index: int) -> None:
        super().__init__(inner)
        self.target = (resource, index)

    async def read_chunk(self, resource: str, index: int) -> tuple[bytes, bytes | None]:
        data, known = await self.inner.read_chunk(resource, index)
        if (resource, index) == self.target:
            return bytes(reversed(data)), None
        return data, known


def test_a_server_sending_other_bytes_with_their_own_hash_is_refused(package: Path) -> None:
    expected = contents(package)

    async def go() -> None:
        provider = LyingProvider(PackageProvider(open_package(package), CHUNK), "kernel", 2)
        server = await start_server(package, provider=provider)
        source = RemoteSource(f"{LOOPBACK}:{server.port}", retry_timeout=2)
        try:
            await source.connect()
            assert await source.fetch("kernel", 1) == expected["kernel"][CHUNK : 2 * CHUNK]
            with pytest.raises(VerificationError) as e:
                await source.fetch("kernel", 2)
            assert "does not match the hash the manifest gave" in one_line(e.value)
            assert source.stats.verify_failures == 1
            assert server.stats.chunks == 2  # it was sent, and refused by the client
            with pytest.raises(DrafterError, match="does not match the hash"):
                await source.fetch("kernel", 0)
        finally:
            await source.close()
            await server.close()

    run(go())


# --- clients that cost the server ----------------------------------------------------


@pytest.mark.serial
def test_silent_and_trickling_clients_meet_the_handshake_deadline(
    package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = contents(package)

    async def go() -> None:
        server = await start_server(package, limits=ServerLimits(handshake_timeout=1.0))
        try:
            normal = await timed_pull(server.port, expected)
            started = time.monotonic()
            silent = [Raw(*await raw_open(server.port)) for _ in range(20)]
            # One byte of a good hello every 0.1 s: every read makes progress, the
            # deadline is for the whole handshake.
            trickler = Raw(*await raw_open(server.port))
            hello = wire.Hello(wire.VERSION, 0, security.new_nonce()).body()

            async def trickle() -> None:
                with contextlib.suppress(ConnectionError):
                    for byte in wire.frame(MsgType.CLIENT_HELLO, hello):
                        trickler.writer.write(bytes([byte]))
                        await asyncio.sleep(0.1)

            trickling = asyncio.create_task(trickle())
            # A good hello, then never the proof.
            reader, writer = await raw_open(server.port)
            mute = Raw(reader, writer)
            writer.write(wire.frame(MsgType.CLIENT_HELLO, hello))
            attacked = await timed_pull(server.port, expected)
            attackers = [*silent, trickler, mute]
            closed = await asyncio.gather(*(a.closed_by_server(4) for a in attackers))
            assert all(closed)
            assert time.monotonic() - started < 4
            trickling.cancel()
            for a in attackers:
                a.abort()
            assert fast_enough(attacked, normal), (attacked, normal)
            timed_out = [
                r for r in caplog.records if r.name == SERVER_LOG and "timed out" in r.message
            ]
            assert len(timed_out) == 22
            assert len(records_for(caplog, trickler.local)) == 1
        finally:
            await server.close()

    run(go())


@pytest.mark.serial
def test_the_connection_cap_pauses_accepting(package: Path) -> None:
    expected = contents(package)

    async def go() -> None:
        limits = ServerLimits(max_connections=4, handshake_timeout=20)
        server = await start_server(package, limits=limits)
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, server.stats.connections)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        holders: list[Raw] = []
        extras: list[Raw] = []
        try:
            normal = await timed_pull(server.port, expected)
            holders = [Raw(*await raw_open(server.port)) for _ in range(4)]
            extras = [Raw(*await raw_open(server.port)) for _ in range(6)]  # beyond the cap
            await asyncio.sleep(0.3)
            assert server.stats.connections == 4
            good = RemoteSource(f"{LOOPBACK}:{server.port}")
            connecting = asyncio.create_task(good.connect())
            await asyncio.sleep(0.5)
            assert not connecting.done()  # waiting in the backlog, not refused
            for raw in [*extras, holders.pop()]:
                raw.abort()
            await asyncio.wait_for(connecting, 5)  # a slot freed: it is served
            started = time.monotonic()
            assert await pull(good, expected) == expected
            await good.close()
            # One round of timed_pull is a connect plus five pulls.
            assert fast_enough((time.monotonic() - started) * 5, normal)
            assert most == 4
        finally:
            watcher.cancel()
            for raw in holders:
                raw.abort()
            await server.close()

    run(go())


@pytest.mark.serial
def test_clients_that_do_not_read_are_dropped(
    package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that ask and never read what they asked for (chunks, or the answers to
    a flood of pings) fill their send buffer: the server stops reading from them, holds
    little for them, and the write-stall timeout drops them."""
    expected = contents(package)

    async def go() -> None:
        server = await start_server(package, limits=ServerLimits(write_stall_timeout=2.0))
        flooding: list[asyncio.Task[None]] = []
        try:
            normal = await timed_pull(server.port, expected)
            requesters = [await raw_connect(server.port, rcvbuf=4096) for _ in range(3)]
            for raw in requesters:
                jobs = data_requests(raw)
                for n in range(300):
                    raw.request(*jobs[n % len(jobs)], n + 1)
            pingers = [await raw_connect(server.port, rcvbuf=4096) for _ in range(2)]

            async def flood(raw: Raw) -> None:
                pings = wire.frame(MsgType.PING, b"", 1) * 10_000
                with contextlib.suppress(ConnectionError):
                    while True:
                        raw.writer.write(pings)
                        await raw.writer.drain()

            flooding = [asyncio.create_task(flood(raw)) for raw in pingers]
            # The server answers pings until some 4 MiB of answers wait in the kernel for
            # each; then it stops reading from them and the whole process (server and
            # attackers, all here) goes quiet.
            await until_idle(time.process_time)
            attacked = await timed_pull(server.port, expected)
            assert fast_enough(attacked, normal), (attacked, normal)
            attackers = [*requesters, *pingers]
            for raw in attackers:
                deadline = time.monotonic() + 15
                while not records_for(caplog, raw.local) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            lines = [await one_line_logged(caplog, raw.local) for raw in attackers]
            assert all("write stalled" in line for line in lines), lines
            # Closing gives unsent data a second (linger), then aborts.
            deadline = time.monotonic() + 3
            while server.stats.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert server.stats.connections == 0
        finally:
            for task in flooding:
                task.cancel()
            await server.close()

    run(go(), timeout=60)


@pytest.mark.serial
def test_more_than_1024_outstanding_requests_are_too_many(
    package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        # The limit is on requests not yet answered: 2000 in two batches are fine.
        server = await start_server(package)
        raw = await raw_connect(server.port)
        jobs = data_requests(raw)
        for batch in range(2):
            for n in range(1000):
                raw.request(*jobs[n % len(jobs)], batch * 1000 + n + 1)
            for _ in range(1000):
                kind, _, _ = await raw.read()
                assert kind == MsgType.CHUNK
        raw.abort()
        await server.close()
        # 1025 at once at a server that answers one every 50 ms are one too many.
        server = await start_server(package, delay=0.05)
        try:
            raw = await raw_connect(server.port)
            for n in range(1025):
                raw.request(*jobs[n % len(jobs)], n + 1)
            code, text = await raw.read_error()
            assert code == ErrorCode.TOO_MANY
            assert "more than 1024 outstanding requests" in text
            raw.abort()
            assert "1024" in await one_line_logged(caplog, raw.local)
        finally:
            await server.close()

    run(go())


@pytest.mark.serial
def test_an_idle_client_is_dropped(package: Path, caplog: pytest.LogCaptureFixture) -> None:
    expected = contents(package)

    async def go() -> None:
        server = await start_server(package, limits=ServerLimits(idle_timeout=0.5))
        try:
            idle = await raw_connect(server.port, token=None)
            pinging = await raw_connect(server.port)
            started = time.monotonic()
            ping_answers = 0

            async def keep_pinging() -> None:
                nonlocal ping_answers
                for n in range(10):
                    pinging.write(MsgType.PING, b"", n + 1)
                    kind, request_id, _ = await pinging.read()
                    assert (kind, request_id) == (MsgType.PING, n + 1)
                    ping_answers += 1
                    await asyncio.sleep(0.15)

            pings = asyncio.create_task(keep_pinging())
            code, text = await idle.read_error(timeout=3)
            assert code == ErrorCode.TIMEOUT and "idle for 0.5 s" in text
            assert 0.4 < time.monotonic() - started < 2.5
            assert "idle for 0.5 s" in await one_line_logged(caplog, idle.local)
            await pings  # 1.5 s of pings: it was not idle, it stays
            assert ping_answers == 10
            pinging.abort()
            # A RemoteSource left idle is dropped too; it reconnects when asked.
            source = RemoteSource(f"{LOOPBACK}:{server.port}", retry_timeout=5)
            await source.connect()
            await asyncio.sleep(1.5)
            assert await source.fetch("kernel", 0) == expected["kernel"][:CHUNK]
            assert source.reconnects >= 1
            await source.close()
        finally:
            await server.close()

    run(go())


def test_an_error_frame_with_megabytes_of_text_is_one_capped_line(
    package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forged = b"oops\nWARNING drafter.transport.server: all good\r\x1b[2J\xe2\x80\xae"
    text = (forged * (4 * MIB // len(forged) + 1))[: 4 * MIB]
    largest = text[: wire.MAX_CLIENT_BODY - 2]  # the most a client may send in a frame

    async def go() -> None:
        server = await start_server(package, token=TOKEN)
        try:
            raw = await raw_connect(server.port, token=TOKEN)
            raw.write(MsgType.ERROR, struct.pack(">H", ErrorCode.PROTOCOL) + largest)
            assert await raw.closed_by_server(5)
            line = await one_line_logged(caplog, raw.local)
            assert "reported protocol" in line
            assert len(line) < 5000, len(line)  # the text is cut to 1 KiB (escaped)
            for bad in ("\n", "\r", "\x1b", "\u202e"):
                assert bad not in line
            # 4 MiB after the proof: refused from the frame's header, never buffered.
            raw = await raw_connect(server.port, token=TOKEN)
            raw.write(MsgType.ERROR, struct.pack(">H", ErrorCode.PROTOCOL) + text)
            await raw.closed_by_server(5)
            assert "exceeds the limit" in await one_line_logged(caplog, raw.local)
            # The same text before the proof: refused from the frame's header.
            raw = Raw(*await raw_open(server.port))
            hello = wire.Hello(wire.VERSION, wire.HELLO_TOKEN, security.new_nonce()).body()
            raw.writer.write(wire.frame(MsgType.CLIENT_HELLO, hello))
            assert (await raw.read(sealed=False))[0] == MsgType.SERVER_HELLO
            raw.writer.write(wire.frame(MsgType.ERROR, text))
            await raw.closed_by_server(5)
            assert "exceeds the limit" in await one_line_logged(caplog, raw.local)
        finally:
            await server.close()

    run(go())
    assert all(r.exc_info is None for r in caplog.records)


# --- servers that cost the client ----------------------------------------------------


def fake_manifest() -> tuple[dict[str, int], list[bytes]]:
    hashes = [os.urandom(32) for _ in range(3)]
    return {"memory": 3 * CHUNK}, hashes


async def greet_as_server(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flags: int = 0
) -> None:
    """Read a client's hello and proof, answer with a proper hello in between."""
    length, _, _ = read_header(await reader.readexactly(wire.HEADER_SIZE))
    await reader.readexactly(length)
    hello = wire.Hello(wire.VERSION, flags | wire.HELLO_ZSTD, security.new_nonce()).body()
    writer.write(wire.frame(MsgType.SERVER_HELLO, hello))
    length, _, _ = read_header(await reader.readexactly(wire.HEADER_SIZE))
    await reader.readexactly(length)


async def welcome_first_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Greet a client as a proper server of :func:`fake_manifest` would; the id of the
    first frame it sends next."""
    manifest, hashes = fake_manifest()
    await greet_as_server(reader, writer)
    welcome = wire.Welcome(bytes(32), CHUNK, manifest, b"{}").body()
    writer.write(wire.frame(MsgType.WELCOME, welcome))
    writer.write(wire.frame(MsgType.HASHES, wire.Hashes(0, 0, b"".join(hashes)).body()))
    writer.write(wire.frame(MsgType.HOT, b""))
    _, _, request_id = read_header(await reader.readexactly(wire.HEADER_SIZE))
    return request_id


def test_a_server_sending_unrelated_frames_does_not_hold_a_fetch_forever() -> None:
    """The server answers every request with frames that answer nothing (pings, chunks
    for requests nobody made): the fetch fails after chunk_timeout and the retry
    window, although frames keep coming."""
    sent = 0

    async def babbler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        with contextlib.suppress(Exception):
            request_id = await welcome_first_request(reader, writer)
            payload = os.urandom(CHUNK)
            head = wire.ChunkHead(0, 0, 0, CHUNK, digest(payload)).encode()
            while True:
                writer.write(wire.frame(MsgType.PING, b"", request_id))
                writer.write(wire.frame(MsgType.CHUNK, head + payload, request_id + 1000))
                sent += 2
                await writer.drain()
                await asyncio.sleep(0.01)

    async def go() -> None:
        fake = await asyncio.start_server(babbler, LOOPBACK, 0)
        port = fake.sockets[0].getsockname()[1]
        source = RemoteSource(f"{LOOPBACK}:{port}", chunk_timeout=1, retry_timeout=1)
        try:
            await source.connect()
            started = time.monotonic()
            with pytest.raises(DrafterError) as e:
                await asyncio.wait_for(source.fetch("memory", 1), 10)
            elapsed = time.monotonic() - started
            assert 0.9 < elapsed < 5, elapsed
            text = one_line(e.value)
            assert "lost the connection" in text and "no answer for 1 s" in text
            assert sent > 50  # frames kept coming all along
        finally:
            await source.close()
            fake.close()

    run(go())


@pytest.mark.parametrize("limit", [wire.MAX_BODY, wire.MAX_ANSWER])
def test_an_answer_in_endless_parts_is_refused_at_its_limit(limit: int) -> None:
    """A server answers a control call with PART frames that never end (and parts for
    calls nobody made): the client keeps none of the latter, and refuses the answer
    once it passes the call's limit (one frame, unless the call allows 64 MiB)
    instead of growing without bound."""
    sent = 0

    async def flooder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        with contextlib.suppress(Exception):
            request_id = await welcome_first_request(reader, writer)
            part = bytes(wire.MAX_BODY)
            while True:
                writer.write(wire.frame(MsgType.PART, part, request_id + 7))  # no such call
                writer.write(wire.frame(MsgType.PART, part, request_id))
                sent += 1
                await writer.drain()

    async def go() -> None:
        fake = await asyncio.start_server(flooder, LOOPBACK, 0)
        port = fake.sockets[0].getsockname()[1]
        source = RemoteSource(f"{LOOPBACK}:{port}", retry_timeout=1)
        try:
            await source.connect()
            with pytest.raises(DrafterError):
                await asyncio.wait_for(source.call(MsgType.DIRTY_LIST, max_answer=limit), 30)
            assert limit // wire.MAX_BODY <= sent < limit // wire.MAX_BODY + 8
        finally:
            await source.close()
            fake.close()

    run(go())


def _welcome(
    resources: list[tuple[bytes, int]] | None = None,
    chunk: int = CHUNK,
    count: int | None = None,
    proof: bytes = bytes(32),
    config: bytes = b"",
    cut: int = 0,
) -> bytes:
    resources = [(b"memory", 3 * CHUNK)] if resources is None else resources
    body = proof + struct.pack(">IB", chunk, len(resources) if count is None else count)
    body += b"".join(struct.pack(">BQ", len(n), size) + n for n, size in resources)
    body += config
    return wire.frame(MsgType.WELCOME, body[: len(body) - cut])


_H = [bytes([i + 1]) * 32 for i in range(4)]
_GOOD_HASHES = wire.frame(MsgType.HASHES, wire.Hashes(0, 0, b"".join(_H[:3])).body())
_GOOD_START = _welcome() + _GOOD_HASHES


def _hot(body: bytes) -> bytes:
    return wire.frame(MsgType.HOT, body)


def _error(text: bytes, code: ErrorCode = ErrorCode.PROTOCOL) -> bytes:
    return wire.frame(MsgType.ERROR, struct.pack(">H", code) + text)


# name: (bytes instead of the server hello, or bytes after the client's proof; needle)
GREETINGS: dict[str, tuple[str, bytes, str]] = {
    "hello with bad magic": ("hello", wire.frame(MsgType.SERVER_HELLO, b"XXXX" + bytes(36)),
                             "bad magic"),
    "hello too short": ("hello", wire.frame(MsgType.SERVER_HELLO, b"DRFT\0\2"), "bad magic"),
    "hello with reserved bits": ("hello", wire.header(MsgType.SERVER_HELLO, 40, 0, flags=3)
                                 + bytes(40), "malformed frame header"),
    "hello is 4 MiB of error": ("hello", wire.header(MsgType.ERROR, 4 * MIB) + bytes(4 * MIB),
                                "exceeds the limit of 1024"),
    "hello is a chunk": ("hello", wire.frame(MsgType.CHUNK, bytes(60)), "expected a server hello"),
    "welcome chunk size 0": ("auth", _welcome(chunk=0), "bad chunk size"),
    "welcome chunk size 5 MiB": ("auth", _welcome(chunk=5 * MIB), "bad chunk size"),
    "welcome 200 resources": ("auth", _welcome(count=200), "resource count"),
    "welcome resources cut short": ("auth", _welcome(count=3), "malformed welcome"),
    "welcome name beyond the body": ("auth", _welcome(cut=3), "bad resource name"),
    "welcome duplicate names": ("auth", _welcome([(b"disk", 1), (b"disk", 1)]),
                                "bad resource name"),
    "welcome empty name": ("auth", _welcome([(b"", 1)]), "bad resource name"),
    "welcome non-ascii name": ("auth", _welcome([("mém".encode(), 1)]), "malformed welcome"),
    "welcome of 10 bytes": ("auth", wire.frame(MsgType.WELCOME, bytes(10)), "malformed welcome"),
    "welcome resource of 2^60 bytes": ("auth", _welcome([(b"disk", 1 << 60)]), "too large"),
    "welcome of 2^40 chunks": ("auth", _welcome([(b"disk", 1 << 40)], chunk=1),
                               "more than 4194304 chunks"),
    "error with newlines instead of the welcome": (
        "auth", _error(b"line one\nfake: error: all good\r\x1b[2J" * 40_000, ErrorCode.AUTH),
        "refused the connection"),
    "transient error during the hashes": (
        "auth", _welcome() + _error(b"disk on fire", ErrorCode.INTERNAL), "the server said"),
    "unknown frame instead of the welcome": ("auth", wire.frame(99, b""), "got type 99"),
    "hashes out of order": ("auth", _welcome() + wire.frame(
        MsgType.HASHES, wire.Hashes(0, 1, b"".join(_H[:2])).body()), "out of order"),
    "hashes of another resource": ("auth", _welcome() + wire.frame(
        MsgType.HASHES, wire.Hashes(3, 0, b"".join(_H[:3])).body()), "out of order"),
    "hashes of ragged length": ("auth", _welcome() + wire.frame(
        MsgType.HASHES, wire.Hashes(0, 0, bytes(33)).body()), "malformed hash list"),
    "more hashes than chunks": ("auth", _welcome() + wire.frame(
        MsgType.HASHES, wire.Hashes(0, 0, b"".join(_H)).body()), "out of order"),
    "hash frame beyond the limit": ("auth", _welcome()
                                    + wire.header(MsgType.HASHES, wire.MAX_BODY + 1),
                                    "exceeds the limit"),
    "hot list before the hashes": ("auth", _welcome() + _hot(b""), "expected hashes"),
    "hot list of 4 billion chunks": ("auth", _GOOD_START + _hot(struct.pack(">BI", 0, 2**32 - 1)
                                                               + bytes(8)), "malformed hot list"),
    "hot chunk beyond the end": ("auth", _GOOD_START + _hot(wire.encode_hot({0: [3]})),
                                 "beyond the end"),
    "hot list of an unknown resource": ("auth", _GOOD_START + _hot(wire.encode_hot({5: [0]})),
                                        "malformed hot list"),
    "hot list cut short": ("auth", _GOOD_START + _hot(b"\0\0\0"), "malformed hot list"),
    "hot resource twice": ("auth", _GOOD_START + _hot(wire.encode_hot({0: [1]}) * 2),
                           "malformed hot list"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(GREETINGS))
def test_an_absurd_greeting_is_a_one_line_error(name: str) -> None:
    where, payload, needle = GREETINGS[name]

    async def hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            if where == "hello":
                length, _, _ = read_header(await reader.readexactly(wire.HEADER_SIZE))
                await reader.readexactly(length)
            else:
                await greet_as_server(reader, writer)
            writer.write(payload)
            await writer.drain()
            await asyncio.sleep(30)  # the connection stays open: the bytes must fail it

    async def go() -> None:
        fake = await asyncio.start_server(hostile, LOOPBACK, 0)
        port = fake.sockets[0].getsockname()[1]
        source = RemoteSource(f"{LOOPBACK}:{port}", chunk_timeout=10)
        started = time.monotonic()
        try:
            with pytest.raises(DrafterError) as e:
                await source.connect()
            assert time.monotonic() - started < 3  # the bytes failed it, not a timeout
            text = one_line(e.value)
            assert needle in text, text
            assert "\x1b" not in text
        finally:
            await source.close()
            fake.close()

    run(go())


@pytest.mark.parametrize("sealed", [True, False], ids=["bad tag", "no tag"])
def test_a_server_without_the_token_is_refused(sealed: bool) -> None:
    """A server that asks for a token but does not know it cannot seal its welcome (or
    prove itself): the client refuses it."""

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await greet_as_server(reader, writer, flags=wire.HELLO_TOKEN)
            tag = os.urandom(security.TAG_SIZE) if sealed else b""
            writer.write(_welcome() + tag + _GOOD_HASHES + tag + _hot(b"") + tag)
            await writer.drain()
            await asyncio.sleep(30)

    async def go() -> None:
        fake = await asyncio.start_server(impostor, LOOPBACK, 0)
        port = fake.sockets[0].getsockname()[1]
        source = RemoteSource(f"{LOOPBACK}:{port}", token=TOKEN, chunk_timeout=10)
        try:
            with pytest.raises(DrafterError, match="refused the connection") as e:
                await asyncio.wait_for(source.connect(), 3)
            one_line(e.value)
        finally:
            await source.close()
            fake.close()

    run(go())


# --- drafter-registry as a process ----------------------------------------------------


def registry_args(package: Path, token_file: Path, *more: str) -> list[str]:
    return ["--package-path", str(package), "--laddr", f"{LOOPBACK}:0",
            "--token-file", str(token_file), "--chunk-size", str(CHUNK), *more]  # fmt: skip


@pytest.mark.serial
def test_running_out_of_descriptors_does_not_spin(
    package: Path, token_file: Path, workdir: Path
) -> None:
    expected = contents(package)
    reg = start_registry(*registry_args(package, token_file), stderr_path=workdir / "reg.err")
    holders: list[socket.socket] = []
    try:
        normal = run(timed_pull(reg.port, expected, TOKEN))
        # Leave it two descriptors: connections beyond that fail to be accepted (EMFILE).
        room = reg.descriptors() + 2
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.prlimit(reg.proc.pid, resource.RLIMIT_NOFILE, (room, hard))
        holders = [socket.create_connection((LOOPBACK, reg.port)) for _ in range(40)]
        time.sleep(1)
        cpu = reg.cpu_seconds()
        time.sleep(3)
        assert reg.cpu_seconds() - cpu < 0.5  # it waits; it does not retry in a loop
        assert reg.descriptors() <= room
        stderr = reg.stderr()
        assert stderr.count("out of file descriptors") == 1, stderr
        assert "Traceback" not in stderr and len(stderr) < 4096, stderr
        for sock in holders:
            sock.close()
        holders = []
        # Still limited to two spare descriptors: a well-behaved client is served again.
        attacked = run(timed_pull(reg.port, expected, TOKEN))
        assert fast_enough(attacked, normal), (attacked, normal)
        assert reg.proc.poll() is None
    finally:
        for sock in holders:
            sock.close()
        assert reg.stop() == 0
    stderr = reg.stderr()
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) < 60, stderr  # one line per dropped connection at most


@pytest.mark.serial
def test_registry_memory_and_speed_under_attack(
    package: Path, token_file: Path, workdir: Path
) -> None:
    """Many clients that ask for chunks and never read them, ping floods that never read
    the answers, and silent connections: the registry's memory stays bounded and a
    well-behaved client is served at normal speed meanwhile."""
    expected = contents(package)
    reg = start_registry(*registry_args(package, token_file), stderr_path=workdir / "reg.err")
    try:
        normal = run(timed_pull(reg.port, expected, TOKEN))
        before = reg.rss_mib()

        async def attack() -> tuple[float, float]:
            attackers: list[Raw] = []
            tasks: list[asyncio.Task[Any]] = []
            try:
                for _ in range(40):
                    raw = await raw_connect(reg.port, token=TOKEN, rcvbuf=4096)
                    jobs = data_requests(raw)
                    for n in range(1000):
                        raw.request(*jobs[n % len(jobs)], n + 1)
                    attackers.append(raw)

                async def flood(raw: Raw) -> None:
                    for n in range(10**9):
                        for _ in range(1000):
                            raw.write(MsgType.PING, b"", n)
                        await raw.writer.drain()

                for _ in range(10):
                    raw = await raw_connect(reg.port, token=TOKEN, rcvbuf=4096)
                    tasks.append(asyncio.create_task(flood(raw)))
                    attackers.append(raw)
                attackers += [Raw(*await raw_open(reg.port)) for _ in range(40)]
                # Until the registry has stopped reading from the floods (their answers
                # pile up unread): it goes quiet then, and stays so.
                await until_idle(reg.cpu_seconds)
                attacked = await timed_pull(reg.port, expected, TOKEN)
                await asyncio.sleep(1)
                for task in tasks:
                    assert not task.done()  # the floods are held back, not dropped yet
                return attacked, reg.rss_mib()
            finally:
                for task in tasks:
                    task.cancel()
                for raw in attackers:
                    raw.abort()

        attacked, during = run(attack(), timeout=60)
        assert fast_enough(attacked, normal), (attacked, normal)
        # About 16 MiB here; a server keeping 8 MiB of parsed frames per flood: ~95.
        assert during - before < 40, (before, during)
        assert reg.status("VmHWM") / 1024 - before < 64
        # The attackers are gone; the registry serves on.
        assert fast_enough(run(timed_pull(reg.port, expected, TOKEN)), normal)
    finally:
        assert reg.stop() == 0
    stderr = reg.stderr()
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) < 100, stderr[-3000:]


# --- the commands ------------------------------------------------------------------------


def test_registry_refuses_other_interfaces_without_a_token(package: Path, workdir: Path) -> None:
    env = env_without_token()
    port = free_port()
    for laddr in (f"0.0.0.0:{port}", f":{port}", f"[::]:{port}"):
        result = run_command("drafter-registry", "--package-path", str(package),
                             "--laddr", laddr, env=env, timeout=30)  # fmt: skip
        assert_one_line_error(result, "without a token", "drafter-token", "--insecure")
        assert nothing_listens(port)
    # The default address narrows to loopback without a token.
    assert security.listen_address(None, ":1337", None, False) == ("127.0.0.1", 1337)
    assert security.listen_address(None, ":1337", TOKEN, False) == ("", 1337)
    assert security.listen_address("[::1]:5", ":1337", None, False) == ("::1", 5)
    # --insecure: it serves anyone who can connect, and says so.
    reg = start_registry("--package-path", str(package), "--laddr", "0.0.0.0:0", "--insecure",
                         env=env, stderr_path=workdir / "insecure.err")  # fmt: skip
    try:
        expected = contents(package)
        run(timed_pull(reg.port, expected, rounds=1))
    finally:
        assert reg.stop() == 0
    assert "no token" in reg.stderr()


def test_registry_refuses_half_tls_and_short_tokens(package: Path, workdir: Path) -> None:
    env = env_without_token()
    base = ["--package-path", str(package), "--laddr", f"{LOOPBACK}:0"]
    pem = workdir / "some.pem"
    pem.write_text("x\n")
    short = workdir / "short"
    short.write_text("s3cret\n")
    empty = workdir / "empty"
    empty.write_text("\n")
    for args, needles, extra_env in (
        ([*base, "--tls-cert", str(pem)], ["--tls-cert needs --tls-key"], {}),
        ([*base, "--tls-key", str(pem)], ["--tls-key needs --tls-cert"], {}),
        ([*base, "--token-file", str(short)], ["too short", "drafter-token"], {}),
        ([*base, "--token-file", str(empty)], ["is empty", "drafter-token"], {}),
        (base, ["$DRAFTER_TOKEN", "too short"], {security.TOKEN_ENV: "short"}),
    ):
        result = run_command("drafter-registry", *args, env={**env, **extra_env}, timeout=30)
        assert_one_line_error(result, *needles)


def test_drafter_token_makes_a_usable_token(package: Path, workdir: Path) -> None:
    path = workdir / "made.token"
    made = run_command("drafter-token", str(path))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert len(token) >= security.MIN_TOKEN_CHARS and token.isprintable()
    assert security.load_token(path) == token
    # It does not overwrite a token by accident; --force makes a new one.
    assert_one_line_error(run_command("drafter-token", str(path)), "exists already")
    assert path.read_text().strip() == token
    assert run_command("drafter-token", "--force", str(path)).returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() != token
    printed = run_command("drafter-token")
    assert printed.returncode == 0 and len(printed.stdout.strip()) >= security.MIN_TOKEN_CHARS
    # A token file lets the registry listen on every interface; the client needs it.
    token = path.read_text().strip()
    reg = start_registry("--package-path", str(package), "--laddr", "0.0.0.0:0",
                         "--token-file", str(path), env=env_without_token(),
                         stderr_path=workdir / "reg.err")  # fmt: skip
    try:
        expected = contents(package)
        run(timed_pull(reg.port, expected, token, rounds=1))
        with pytest.raises(DrafterError, match="requires a token"):
            run(timed_pull(reg.port, expected, None, rounds=1))
    finally:
        assert reg.stop() == 0
