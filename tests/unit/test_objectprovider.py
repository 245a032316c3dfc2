"""drafter-registry over an object (src/drafter/objects/provider.py): a client of the
wire protocol gets the package's bytes, checked against the index, with a few range
requests thanks to the read-ahead; a store that lies reaches the client as an error,
never as bytes."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from pathlib import Path

import pytest
from test_objectsource import FAST, fetch_all, make_package, member_bytes

from drafter.chunks import ZERO_HASH
from drafter.errors import DrafterError
from drafter.objects import ObjectChanged, ObjectSource
from drafter.objects.provider import ObjectProvider
from drafter.transport.client import RemoteSource
from drafter.transport.server import ChunkServer
from support.common import command
from support.hostile_http import Fault, HostileServer

LOOPBACK = "127.0.0.1"


@pytest.fixture
def served(tmp_path: Path):
    package = make_package(tmp_path)
    with HostileServer() as server:
        server.put("p.drft", package.read_bytes())
        yield server, package


async def provider_of(server: HostileServer, **kw: int) -> ObjectProvider:
    source = ObjectSource(server.url + "p.drft", options=FAST)
    await source.connect()
    return ObjectProvider(source, **kw)


def test_a_wire_client_reads_the_package_through_the_registry(served) -> None:
    server, package = served

    async def go() -> None:
        provider = await provider_of(server)
        registry = ChunkServer(provider)
        await registry.start(LOOPBACK, 0)
        gets = server.gets()
        try:
            client = RemoteSource(f"{LOOPBACK}:{registry.port}")
            await client.connect()
            try:
                assert client.hashes == provider.source.hashes
                assert client.config == provider.source.config
                assert client.hot == provider.source.hot
                got = await fetch_all(client)  # type: ignore[arg-type]
            finally:
                await client.close()
        finally:
            await registry.close()
            await provider.close()
        assert got == member_bytes(package)
        hashes = provider.source.hashes
        nonzero = sum(h != ZERO_HASH for hs in hashes.values() for h in hs)
        stretches = sum(
            h != ZERO_HASH and (i == 0 or hs[i - 1] == ZERO_HASH)
            for hs in hashes.values()
            for i, h in enumerate(hs)
        )
        # one range request per stretch of non-zero chunks (all shorter than the
        # read-ahead), not one per chunk
        assert stretches < nonzero
        assert server.gets() - gets == stretches
        assert provider.reads == nonzero and provider.hits > nonzero // 2

    asyncio.run(go())


def test_random_and_concurrent_reads_match_and_hold_a_bounded_amount(served) -> None:
    server, package = served
    want = member_bytes(package)

    async def go() -> None:
        provider = await provider_of(server, held_bytes=1 << 20)
        try:
            size = provider.chunk_size
            asks = [(r, i) for r, hs in provider.source.hashes.items() for i in range(len(hs))]
            random.Random(7).shuffle(asks)
            asks += asks[:20]  # some twice, and at once
            results = await asyncio.gather(*(provider.read_chunk(r, i) for r, i in asks))
            for (r, i), (data, digest) in zip(asks, results, strict=True):
                assert data == want[r][i * size : (i + 1) * size]
                assert digest == provider.source.hashes[r][i]
            assert provider._held_size <= 1 << 20
            with pytest.raises(DrafterError):
                await provider.read_chunk("memory", 10_000)
        finally:
            await provider.close()

    asyncio.run(go())


def test_a_replaced_object_fails_the_read_and_is_never_served(served) -> None:
    server, _ = served

    async def go() -> None:
        provider = await provider_of(server)
        try:
            server.fault(Fault.REPLACE)
            with pytest.raises(ObjectChanged):
                await provider.read_chunk("memory", 0)
            with pytest.raises(ObjectChanged):  # asked again: asked again of the store
                await provider.read_chunk("memory", 0)
            assert not provider._held
        finally:
            await provider.close()

    asyncio.run(go())


def test_a_read_without_read_ahead_asks_for_that_chunk_alone(served) -> None:
    server, package = served

    async def go() -> None:
        provider = await provider_of(server, read_ahead=1)
        try:
            gets = server.gets()
            data, _ = await provider.read_chunk("memory", 15)  # the last: random bytes
            size = provider.chunk_size
            assert data == member_bytes(package)["memory"][15 * size : 16 * size]
            assert server.gets() - gets == 1
        finally:
            await provider.close()

    asyncio.run(go())


@pytest.mark.parametrize(
    "args, says",
    [
        (["--package-path", "s3://"], "names no object"),
        (["--package-path", "s3://b/k\x01"], "not a usable URL"),
        (["--package-path", "s3://b/k"], "not an S3 bucket name"),
        (["--package-path", "x.drft", "--tls-ca", "/etc/hosts"], "are for an s3://"),
        (["--package-path", "s3://bucket/k", "--chunk-size", "5"], "--chunk-size"),
        (["--package-path", "s3://bucket/k", "--retry-timeout", "0"], "--retry-timeout"),
        (["--package-path", "s3://bucket/k", "--index-digest", "zz"], "64 hexadecimal"),
    ],
)
def test_bad_object_flags_of_the_registry_are_one_line(args: list[str], says: str) -> None:
    result = subprocess.run(
        [command("drafter-registry"), "--laddr", "127.0.0.1:0", *args],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert says in lines[-1], result.stderr
    assert len([line for line in lines if "error" in line]) == 1, result.stderr
