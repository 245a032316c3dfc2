"""The host's chunk cache (src/drafter/chunkcache.py), alone and under an ObjectSource:
a second VM of a package fetches nothing the first one fetched, and nothing read back
from the cache is believed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from test_objectsource import FAST, fetch_all, make_package, member_bytes

from drafter.chunkcache import ChunkCache, Filling, take_cached
from drafter.chunks import ZERO_HASH, Priority
from drafter.device import Device
from drafter.errors import DrafterError
from drafter.hashes import digest
from drafter.objects import ObjectSource
from support.chunk_sources import CS, FakeSource, pattern
from support.hostile_http import HostileServer

DATA = pattern(6 * CS)


def test_a_chunk_comes_back_whole_or_not_at_all(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache")
    data = os.urandom(5000)
    h = digest(data)
    assert cache.get(h, len(data)) is None
    cache.put(h, data)
    cache.put(h, data)  # there already: nothing new
    assert cache.stored == 1
    assert cache.get(h, len(data)) == data
    path = tmp_path / "cache" / h.hex()[:2] / h.hex()
    with path.open("r+b") as f:  # a changed byte: removed, not believed
        f.seek(100)
        f.write(bytes([data[100] ^ 1]))
    assert cache.get(h, len(data)) is None
    assert not path.exists()
    cache.put(h, data + b"more")  # a file longer than its chunk: removed too
    assert cache.get(h, len(data)) is None and not path.exists()
    assert cache.hits == 1 and cache.hit_bytes == len(data)
    assert not [p for p in (tmp_path / "cache").rglob("*.part")]


def test_a_link_in_place_of_a_chunk_is_not_followed(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache")
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 100)
    h = digest(b"x" * 100)
    (tmp_path / "cache" / h.hex()[:2]).mkdir()
    (tmp_path / "cache" / h.hex()[:2] / h.hex()).symlink_to(secret)
    assert cache.get(h, 100) is None


def test_the_zero_chunk_is_never_kept(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache")
    cache.put(ZERO_HASH, bytes(4096))
    assert cache.stored == 0 and cache.get(ZERO_HASH, 4096) is None


def test_a_cache_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(DrafterError, match="writable by another user"):
        ChunkCache(shared)
    afile = tmp_path / "file"
    afile.write_bytes(b"")
    with pytest.raises(DrafterError, match="chunk cache"):
        ChunkCache(afile)


def test_a_second_source_of_the_package_fetches_only_what_is_not_cached(
    tmp_path: Path,
) -> None:
    package = make_package(tmp_path)
    cache_dir = tmp_path / "cache"
    with HostileServer() as server:
        server.put("p.drft", package.read_bytes())

        async def start() -> tuple[ObjectSource, dict[str, bytes], int]:
            source = ObjectSource(server.url + "p.drft", options=FAST, cache=ChunkCache(cache_dir))
            await source.connect()
            before = server.gets()
            return source, await fetch_all(source), server.gets() - before

        first, got, first_gets = asyncio.run(start())
        assert got == member_bytes(package)
        nonzero = sum(h != ZERO_HASH for hashes in first.hashes.values() for h in hashes)
        assert first_gets > 0 and first.cache is not None and first.cache.stored == nonzero
        fetched = first.stats.bytes  # the chunks' own bytes (some came compressed)
        assert fetched > 0 and first.stats.wire_bytes > 0

        second, got, second_gets = asyncio.run(start())
        assert got == member_bytes(package)
        assert second_gets == 0 and second.stats.wire_bytes == 0
        assert second.cache is not None and second.cache.hits == nonzero
        assert second.cache.hit_bytes == fetched

        # A damaged chunk in the cache: that chunk alone is fetched again.
        victim = next(p for p in cache_dir.rglob("*") if p.is_file())
        victim.write_bytes(b"not the chunk")
        third, got, third_gets = asyncio.run(start())
        assert got == member_bytes(package)
        assert third_gets == 1 and third.stats.chunks == second.stats.chunks
        assert 0 < third.stats.wire_bytes <= third.chunk_size


# -- wire sources: every pull fills the cache, a later device takes from it ----------


def _device(tmp_path: Path, name: str, source: Any, hashes: list[bytes]) -> Device:
    device = Device(
        "disk", len(DATA), None, tmp_path / f"{name}.overlay", chunk_size=CS, source=source
    )
    device.expect(hashes)
    return device


def test_a_wire_pull_fills_the_cache_and_the_next_device_moves_nothing(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache")
    first = FakeSource({"disk": DATA})
    filling = Filling(first, cache)  # type: ignore[arg-type]
    hashes = first.hashes["disk"]

    async def pull(device: Device) -> None:
        await device.ensure_runs(list(range(device.chunks)), Priority.BACKGROUND, 16)

    one = _device(tmp_path, "one", filling, hashes)
    asyncio.run(pull(one))
    assert first.calls and cache.stored == len(hashes)

    second = FakeSource({"disk": DATA})
    two = _device(tmp_path, "two", Filling(second, cache), hashes)  # type: ignore[arg-type]
    assert take_cached({"disk": two}, cache) == len(DATA)
    assert two.missing() == [] and second.calls == []  # nothing moved
    assert two.read(0, len(DATA)) == DATA

    # A chunk whose cached copy is damaged is not taken: it is fetched again.
    victim = next(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    victim.write_bytes(b"damaged")
    three = _device(tmp_path, "three", FakeSource({"disk": DATA}), hashes)
    assert take_cached({"disk": three}, cache) == len(DATA) - CS
    assert len(three.missing()) == 1


def test_a_chunk_the_device_refuses_is_not_kept(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache")
    source = FakeSource({"disk": DATA})
    source.wrong_size.add(("disk", 1))  # the device refuses it (a wrong size)
    device = _device(tmp_path, "one", Filling(source, cache), source.hashes["disk"])  # type: ignore[arg-type]

    async def go() -> None:
        with pytest.raises(DrafterError):
            await device.ensure_runs([0, 1, 2], Priority.DEMAND, 16)

    asyncio.run(go())
    assert cache.stored == 2  # chunks 0 and 2, not 1
    assert cache.get(source.hashes["disk"][1], CS) is None
