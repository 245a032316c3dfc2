"""What one client may cost a ChunkServer or drafter-registry, each limit against the
client that would exceed it: the handshake deadline, the connection cap, clients that
do not read, too many outstanding requests, idle clients, huge error frames, running
out of descriptors, and the registry's memory and speed under attack (moved here from
test_wire_hostile.py, whose other attacks on the protocol stay there).

Every test here fails if its protection is removed. Where a server is attacked, a
well-behaved client pulls everything during the attack and must not be much slower
than without it; where memory matters, drafter-registry runs as a process and its
resident memory is read from /proc. These tests measure time and CPU use, so with
pytest -n (scripts/test --fast, ``--dist loadfile``) they run one after another on one
worker, never beside each other, and this module starts first (tests/unit/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drafter.transport import protocol as wire
from drafter.transport import security
from drafter.transport.client import RemoteSource
from drafter.transport.protocol import ErrorCode, MsgType
from drafter.transport.server import ServerLimits
from support.wire import (
    CHUNK,
    LOOPBACK,
    MIB,
    SERVER_LOG,
    Raw,
    build_package,
    contents,
    data_requests,
    one_line_logged,
    pull,
    raw_connect,
    raw_open,
    records_for,
    run,
    start_registry,
    start_server,
    timed_pull,
)

TOKEN = security.new_token()


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


# --- clients that cost the server ----------------------------------------------------


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


@pytest.mark.slow
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
        # 1025 at once at a server whose chunks take 2 s each are one too many (the
        # first answers must not come before the server read the 1025th request: with
        # 50 ms, a loaded machine once read the requests more slowly than that).
        server = await start_server(package, delay=2.0)
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


# --- drafter-registry as a process ----------------------------------------------------


def registry_args(package: Path, token_file: Path, *more: str) -> list[str]:
    return ["--package-path", str(package), "--laddr", f"{LOOPBACK}:0",
            "--token-file", str(token_file), "--chunk-size", str(CHUNK), *more]  # fmt: skip


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


@pytest.mark.slow
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
