"""RemoteSource (drafter/transport/client.py) against a real ChunkServer on 127.0.0.1.

The server serves a small provider in memory whose reads the test can hold and let go
one by one, so what the client has sent is read from the server's own counters while
answers are held back: the window of background bytes in flight and how it grows,
demand fetches passing a full window, fetches sent again after a reconnect, giving up
after ``retry_timeout``, and chunks refused when their bytes or hash are wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from drafter.errors import DrafterError
from drafter.hashes import chunk_hash, digest
from drafter.transport.client import Priority, RemoteSource, VerificationError
from drafter.transport.inflight import INITIAL_WINDOW
from drafter.transport.server import ChunkServer
from support.net import LOOPBACK

BIG = 1 << 20  # the window's tests: INITIAL_WINDOW holds 16 of these
SMALL = 4096


def pattern(chunks: int, chunk_size: int, first: int = 1) -> bytes:
    """``chunks`` chunks, each one byte value repeated (never zero), each different."""
    return b"".join(bytes([(first + i) % 255 + 1]) * chunk_size for i in range(chunks))


class MemoryProvider:
    """A ChunkProvider over bytes in memory (see drafter.transport.server.ChunkProvider).

    Reads of the resources in ``held`` wait until :meth:`release` lets them go (the
    server reads one chunk at a time per connection, so the rest wait in its queue).
    ``answers`` replaces what a read returns: (bytes, their hash or None).
    """

    def __init__(
        self, data: dict[str, bytes], chunk_size: int, held: frozenset[str] = frozenset()
    ) -> None:
        self.chunk_size = chunk_size
        self.data = data
        self.held = held
        self.answers: dict[tuple[str, int], tuple[bytes, bytes | None]] = {}
        self.permits = asyncio.Semaphore(0)  # bound to the loop that first waits on it

    def chunk(self, resource: str, index: int) -> bytes:
        return self.data[resource][index * self.chunk_size : (index + 1) * self.chunk_size]

    def manifest(self) -> dict[str, int]:
        return {name: len(data) for name, data in self.data.items()}

    def config(self) -> bytes:
        return b"{}"

    async def hashes(self, resource: str) -> list[bytes]:
        size = len(self.data[resource])
        return [chunk_hash(self.chunk(resource, i)) for i in range(-(-size // self.chunk_size))]

    def hot(self) -> dict[str, list[int]]:
        return {}

    async def read_chunk(self, resource: str, index: int) -> tuple[bytes, bytes | None]:
        if resource in self.held:
            await self.permits.acquire()
        return self.answers.get((resource, index), (self.chunk(resource, index), None))

    def release(self, reads: int) -> None:
        """Let ``reads`` more held reads go."""
        for _ in range(reads):
            self.permits.release()


@contextlib.asynccontextmanager
async def serving(provider: MemoryProvider, port: int = 0) -> AsyncIterator[ChunkServer]:
    server = ChunkServer(provider)
    await server.start(LOOPBACK, port)
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def connected(port: int, **options: Any) -> AsyncIterator[RemoteSource]:
    source = RemoteSource(f"{LOOPBACK}:{port}", **options)
    await source.connect()
    try:
        yield source
    finally:
        await source.close()


def received(server: ChunkServer, priority: Priority) -> int:
    """Requests of ``priority`` the server has read from its clients so far."""
    return server.stats.requests.get(priority, 0)


async def until(check: Callable[[], bool], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


async def settled(count: Callable[[], int], want: int, what: str) -> None:
    """``count()`` reaches ``want`` and stays there (nothing more arrives in 0.1 s)."""
    with contextlib.suppress(AssertionError):
        await until(lambda: count() >= want, what)
    await asyncio.sleep(0.1)
    assert count() == want, what


def run(coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, 20)

    asyncio.run(bounded())


# --- the window ----------------------------------------------------------------------


def test_background_fetches_fill_the_window_and_it_grows_as_answers_arrive() -> None:
    window = INITIAL_WINDOW // BIG
    count = window + 8
    provider = MemoryProvider({"disk": pattern(count, BIG)}, BIG, held=frozenset({"disk"}))

    async def go() -> None:
        async with serving(provider) as server, connected(server.port) as source:
            fetches = [
                asyncio.ensure_future(source.fetch("disk", i, Priority.BACKGROUND))
                for i in range(count)
            ]
            # Nothing is answered: one window's worth of requests went out, the rest wait.
            await settled(lambda: received(server, Priority.BACKGROUND), window, "a window")
            assert source.window == INITIAL_WINDOW
            # Four answers: the window grows by their bytes (20 MiB), and every request
            # left goes out, 20 in flight: more than the first window would hold.
            provider.release(4)
            await until(lambda: source.stats.chunks == 4, "four answers")
            assert source.window == INITIAL_WINDOW + 4 * BIG
            await settled(lambda: received(server, Priority.BACKGROUND), count, "all requests")
            assert count - 4 <= source.window // BIG
            provider.release(count)
            got = await asyncio.gather(*fetches)
            assert [bytes(g) for g in got] == [provider.chunk("disk", i) for i in range(count)]
            assert source.window == INITIAL_WINDOW + count * BIG
            assert received(server, Priority.BACKGROUND) == count  # each sent once

    run(go())


def test_a_demand_fetch_is_not_held_back_by_a_full_window() -> None:
    window = INITIAL_WINDOW // BIG
    count = window + 8
    data = {"disk": pattern(count, BIG), "memory": pattern(1, BIG, first=100)}
    provider = MemoryProvider(data, BIG, held=frozenset({"disk"}))

    async def go() -> None:
        async with serving(provider) as server, connected(server.port) as source:
            background = [
                asyncio.ensure_future(source.fetch("disk", i, Priority.BACKGROUND))
                for i in range(count)
            ]
            await settled(lambda: received(server, Priority.BACKGROUND), window, "a window")
            # The window is full and 8 background requests wait for room: the demand
            # request goes out at once, past them.
            demand = asyncio.ensure_future(source.fetch("memory", 0, Priority.DEMAND))
            await until(lambda: received(server, Priority.DEMAND) == 1, "the demand request")
            assert received(server, Priority.BACKGROUND) == window
            # One answer (the chunk the server is reading): no room for background
            # requests yet, and the server answers the demand request next.
            provider.release(1)
            assert bytes(await asyncio.wait_for(demand, 5)) == data["memory"]
            assert not any(f.done() for f in background[1:])
            provider.release(count)
            got = await asyncio.gather(*background)
            assert [bytes(g) for g in got] == [provider.chunk("disk", i) for i in range(count)]

    run(go())


# --- reconnecting ----------------------------------------------------------------------


def test_pending_fetches_are_sent_again_after_the_server_drops_the_connection() -> None:
    data = {"memory": pattern(8, SMALL), "disk": pattern(4, SMALL, first=50)}
    stuck = MemoryProvider(data, SMALL, held=frozenset({"memory", "disk"}))  # answers nothing

    async def go() -> None:
        async with serving(stuck) as first:
            port = first.port
            async with connected(port, retry_timeout=5) as source:
                jobs = [("memory", 1, Priority.BACKGROUND), ("memory", 5, Priority.BACKGROUND),
                        ("disk", 3, Priority.BACKGROUND), ("disk", 0, Priority.DEMAND)]  # fmt: skip
                fetches = [asyncio.ensure_future(source.fetch(*job)) for job in jobs]
                await until(lambda: sum(first.stats.requests.values()) == 4, "four requests")
                await first.close()  # it drops the connection with every request unanswered
                async with serving(MemoryProvider(data, SMALL), port) as second:
                    got = await asyncio.wait_for(asyncio.gather(*fetches), 10)
                    assert [bytes(g) for g in got] == [
                        data[r][i * SMALL : (i + 1) * SMALL] for r, i, _ in jobs
                    ]
                    assert source.reconnects == 1
                    # Sent again on the new connection, each once, with its own priority.
                    assert second.stats.accepted == 1
                    assert received(second, Priority.BACKGROUND) == 3
                    assert received(second, Priority.DEMAND) == 1
                    assert first.stats.chunks == 0 and second.stats.chunks == 4

    run(go())


def test_fetches_fail_after_the_retry_timeout_when_the_server_is_gone_for_good() -> None:
    retry = 0.5
    stuck = MemoryProvider({"memory": pattern(4, SMALL)}, SMALL, held=frozenset({"memory"}))

    async def go() -> None:
        server = ChunkServer(stuck)
        await server.start(LOOPBACK, 0)
        async with connected(server.port, retry_timeout=retry) as source:
            fetches = [asyncio.ensure_future(source.fetch("memory", i)) for i in (0, 2)]
            await until(lambda: received(server, Priority.BACKGROUND) == 2, "two requests")
            started = time.monotonic()
            await server.close()  # and nothing listens on its port any more
            for fetch in fetches:
                with pytest.raises(DrafterError, match="lost the connection") as e:
                    await asyncio.wait_for(fetch, 10)
                assert "could not reconnect within 0.5 s" in str(e.value)
                assert not isinstance(e.value, VerificationError)
            waited = time.monotonic() - started
            assert retry <= waited < retry + 5, waited  # it tried again until then
            assert source.failed and source.reconnects == 0
            with pytest.raises(DrafterError, match="lost the connection"):
                await source.fetch("memory", 1, Priority.DEMAND)  # later ones fail at once

    run(go())


# --- verification ---------------------------------------------------------------------


def test_a_chunk_whose_bytes_do_not_match_its_hash_is_refused_and_never_handed_out() -> None:
    data = {"memory": pattern(4, SMALL)}
    provider = MemoryProvider(data, SMALL)
    good = provider.chunk("memory", 1)
    # The server sends the hash its provider gives: the right one, with other bytes.
    provider.answers["memory", 1] = (good[:-1] + b"!", digest(good))

    async def go() -> None:
        async with serving(provider) as server, connected(server.port) as source:
            delivered: list[int] = []
            expected: list[bytes | None] = list(source.hashes["memory"][:3])
            with pytest.raises(VerificationError, match="do not match their hash"):
                await source.fetch_run(
                    "memory", 0, 3, Priority.DEMAND, expected,
                    lambda index, _data, _hash: delivered.append(index),
                )  # fmt: skip
            assert delivered == [0]  # the chunk before it; none from the bad one on
            assert source.stats.verify_failures == 1
            assert server.stats.chunks >= 2  # it was sent, and refused here
            with pytest.raises(DrafterError):
                await source.fetch("memory", 1)  # not handed out later either

    run(go())


def test_a_chunk_whose_hash_is_not_the_expected_one_is_refused_and_never_handed_out() -> None:
    data = {"memory": pattern(4, SMALL)}
    provider = MemoryProvider(data, SMALL)

    async def go() -> None:
        async with serving(provider) as server, connected(server.port) as source:
            # The caller expects another version of chunk 2 than the server has (say, a
            # page written since): honest bytes with their own hash are refused too.
            newer = chunk_hash(b"newer" + bytes(SMALL - 5))
            delivered: list[int] = []
            with pytest.raises(VerificationError, match="does not match the hash"):
                await source.fetch_run(
                    "memory", 1, 2, Priority.DEMAND, [source.hashes["memory"][1], newer],
                    lambda index, _data, _hash: delivered.append(index),
                )  # fmt: skip
            assert delivered == [1]
            assert source.stats.verify_failures == 1
            with pytest.raises(DrafterError):
                await source.fetch_chunk("memory", 2, Priority.DEMAND, newer)

    run(go())


def test_a_chunk_unlike_the_manifest_is_refused_though_it_matches_its_own_hash() -> None:
    data = {"memory": pattern(4, SMALL)}
    provider = MemoryProvider(data, SMALL)
    other = pattern(1, SMALL, first=200)
    provider.answers["memory", 3] = (other, None)  # hashed by the server: consistent

    async def go() -> None:
        async with serving(provider) as server, connected(server.port) as source:
            assert source.hashes["memory"][3] == chunk_hash(provider.chunk("memory", 3))
            assert bytes(await source.fetch("memory", 2)) == provider.chunk("memory", 2)
            with pytest.raises(VerificationError, match="the manifest gave"):
                await source.fetch("memory", 3)
            assert source.stats.verify_failures == 1
            with pytest.raises(DrafterError):
                await source.fetch("memory", 3)

    run(go())
