"""Attacks on the wire protocol (v2), each against the protection meant to stop it.

Every test here fails if its protection is removed. What one client may cost a server
(its limits, memory and speed under attack) is in test_server_limits.py. No QEMU: the
package is synthetic.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

from drafter.errors import DrafterError
from drafter.hashes import digest
from drafter.package import RESOURCES, PackageConfig, Source, open_package, write_package
from drafter.transport import protocol as wire
from drafter.transport import registry, security
from drafter.transport.client import RemoteSource, VerificationError
from drafter.transport.protocol import ErrorCode, MsgType
from drafter.transport.registry import PackageProvider
from support.common import assert_one_line_error, run_command
from support.net import free_port, nothing_listens
from support.wire import (
    CHUNK,
    LOOPBACK,
    MIB,
    FrameProxy,
    WrappedProvider,
    build_package,
    contents,
    data_chunks,
    env_without_token,
    read_header,
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


def one_line(error: BaseException) -> str:
    text = str(error)
    assert text and "\n" not in text and "\r" not in text and len(text) < 5000, text
    return text


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
    for path in (short, empty):
        path.chmod(0o600)
    for args, needles, extra_env in (
        ([*base, "--tls-cert", str(pem)], ["--tls-cert needs --tls-key"], {}),
        ([*base, "--tls-key", str(pem)], ["--tls-key needs --tls-cert"], {}),
        ([*base, "--token-file", str(short)], ["not one `drafter-token` makes"], {}),
        ([*base, "--token-file", str(empty)], ["is empty", "drafter-token"], {}),
        (base, ["$DRAFTER_TOKEN", "drafter-token"], {security.TOKEN_ENV: "short"}),
    ):
        result = run_command("drafter-registry", *args, env={**env, **extra_env}, timeout=30)
        assert_one_line_error(result, *needles)


WEAK_TOKENS = (
    "aaaaaaaaaaaaaaaaaaaaaaaabcdefghi",  # passed the old check (32 characters, 9 kinds)
    "correct-horse-battery-staple-house",  # a dictionary token: recovered in 1 ms
    security.new_token()[len(security.TOKEN_PREFIX) :][:43],  # the older, unchecked form
)


def test_weak_tokens_are_refused_by_every_side(package: Path, workdir: Path) -> None:
    """A token a listener could guess offline from one recorded handshake: the
    registry, the peer and the library refuse it, naming drafter-token."""
    env = env_without_token()
    token_file = workdir / "weak.token"
    for weak in WEAK_TOKENS:
        token_file.write_text(weak + "\n")
        token_file.chmod(0o600)
        try:
            by_file = run_command("drafter-registry", "--package-path", str(package),
                                  "--laddr", f"{LOOPBACK}:0", "--token-file", str(token_file),
                                  env=env, timeout=15)  # fmt: skip
            by_env = run_command("drafter-peer", "--raddr", f"{LOOPBACK}:1", "--laddr",
                                 f"{LOOPBACK}:0", env={**env, security.TOKEN_ENV: weak},
                                 timeout=15)  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"a command ran with the weak token {weak!r}")
        assert_one_line_error(by_file, str(token_file), "not one `drafter-token` makes")
        assert_one_line_error(by_env, "$DRAFTER_TOKEN", "not one `drafter-token` makes")

        async def library(token: str = weak) -> None:
            with pytest.raises(DrafterError, match="not one `drafter-token` makes"):
                await start_server(package, token=token)
            with pytest.raises(DrafterError, match="not one `drafter-token` makes"):
                RemoteSource(f"{LOOPBACK}:1", token=token)

        run(library())


def test_drafter_token_makes_a_usable_token(package: Path, workdir: Path) -> None:
    path = workdir / "made.token"
    made = run_command("drafter-token", str(path))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert token.startswith(security.TOKEN_PREFIX) and len(token) == security.TOKEN_CHARS
    assert security.load_token(path) == token
    # It does not overwrite a token by accident; --force makes a new one.
    assert_one_line_error(run_command("drafter-token", str(path)), "exists already")
    assert path.read_text().strip() == token
    assert run_command("drafter-token", "--force", str(path)).returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() != token
    printed = run_command("drafter-token")
    assert printed.returncode == 0
    assert security.check_token(printed.stdout.strip(), "the printed token")
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


# --- a hostile hot set (issue 22, item 10) ------------------------------------------------


def hot_package(directory: Path, disk_size: int, hot: dict[str, list[tuple[int, int]]]) -> Path:
    """A package of 1 MiB memory and a sparse disk of ``disk_size``, with ``hot``."""
    files: dict[str, Source | Path] = {}
    for resource in RESOURCES[1:]:
        files[resource] = directory / resource
        with open(files[resource], "wb") as f:
            f.write(resource.encode() * 100)
            f.truncate({"memory": MIB, "disk": disk_size}.get(resource, 400))
    path = directory / "hot.drft"
    write_package(path, PackageConfig(1, 1, "console=ttyS0", "02:00:00:00:00:01"), files, hot)
    return path


def test_a_hostile_hot_set_is_expanded_once_not_per_handshake(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hot member of many small ranges (it cost 0.61 s of the event loop per
    handshake): the registry expands and encodes it once, whatever the number of
    clients. Counted in calls, not time."""
    hot = {"disk": [(i * 4096 + 17, 1) for i in range(40_000)]}  # ~0.6 MiB of JSON
    package = hot_package(workdir, 1 << 30, hot)
    spans = encodes = 0
    real_span, real_encode = registry.chunk_span, wire.encode_hot

    def counted_span(*args: int) -> range:
        nonlocal spans
        spans += 1
        return real_span(*args)

    def counted_encode(body: dict[int, list[int]]) -> bytes:
        nonlocal encodes
        encodes += 1
        return real_encode(body)

    monkeypatch.setattr(registry, "chunk_span", counted_span)
    monkeypatch.setattr(wire, "encode_hot", counted_encode)

    async def go() -> None:
        server = await start_server(package, provider=PackageProvider(open_package(package), 4096))
        try:
            counts = []
            for _ in range(3):
                source = RemoteSource(f"{LOOPBACK}:{server.port}", retry_timeout=3)
                await source.connect()
                try:
                    assert len(source.hot["disk"]) == 40_000
                finally:
                    await source.close()
                counts.append((spans, encodes))
        finally:
            await server.close()
        assert counts == [(40_000, 1)] * 3, counts  # all at open, then nothing per client

    run(go())


def test_a_hot_set_one_frame_cannot_hold_is_refused_at_open(workdir: Path) -> None:
    """A hot set over one frame made every client refuse the registry while it logged
    nothing: now the registry refuses the package, in one line, before serving."""
    disk = (wire.MAX_HOT_CHUNKS + 10) * 4096
    package = hot_package(workdir, disk, {"disk": [(0, disk)]})
    with pytest.raises(DrafterError, match="more than one HOT frame holds"):
        PackageProvider(open_package(package), 4096)
    try:
        result = run_command("drafter-registry", "--package-path", str(package), "--laddr",
                             f"{LOOPBACK}:0", "--chunk-size", "4096", env=env_without_token(),
                             timeout=60)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the registry served a hot set no client can take")
    assert_one_line_error(result, str(package), "hot ranges", "--chunk-size")
    # At the default chunk size the same package is served, hot set and all.
    provider = PackageProvider(open_package(package))
    try:
        assert len(provider.hot()["disk"]) == wire.chunk_count(disk, provider.chunk_size)
    finally:
        provider.close()


def test_a_server_cuts_a_hot_set_to_one_frame_and_says_so(
    package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider whose hot set outgrew one frame (a peer's): clients get its first
    chunks, and the server a warning line, instead of a frame every client refuses."""

    class Greedy(WrappedProvider):
        def hot(self) -> dict[str, list[int]]:
            return {"memory": [0] * (wire.MAX_HOT_CHUNKS + 100)}

    async def go() -> None:
        inner = PackageProvider(open_package(package), CHUNK)
        server = await start_server(package, provider=Greedy(inner))
        try:
            source = RemoteSource(f"{LOOPBACK}:{server.port}", retry_timeout=3)
            await source.connect()
            try:
                assert 0 < len(source.hot["memory"]) <= wire.MAX_BODY // 4
            finally:
                await source.close()
        finally:
            await server.close()

    with caplog.at_level("WARNING", logger=SERVER_LOG):
        run(go())
    assert any("does not fit in one frame" in r.message for r in caplog.records)
