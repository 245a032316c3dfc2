"""The pack: chunks compressed while a package is written, read by range from an
object store with fewer bytes, and never believed: a frame that lies about its size,
is damaged or does not unpack to its hash is refused with one line."""

from __future__ import annotations

import asyncio
import os
import tarfile
from pathlib import Path

import blake3
import pytest
import zstandard
from test_objectsource import FAST, MIB, fetch_all, make_package, member_bytes

from drafter.chunks import ZERO_HASH, Priority, chunk_length
from drafter.errors import DrafterError
from drafter.index import DATA, PACK_MEMBER, PACKED_VERSION, PackageIndex, parse_index
from drafter.objects import ObjectSource
from drafter.pack import UnpackError, unpack
from drafter.package import PackageConfig, open_package, write_package
from drafter.transport.inflight import VerificationError
from support.hostile_http import Fault, HostileServer

DCTX = zstandard.ZstdDecompressor()


def text_package(directory: Path, pack: bool = True) -> Path:
    """A package whose memory and disk are text (they compress), with a hole, and a
    kernel of random bytes (it does not)."""
    files = {}
    line = b"".join(b"key:%06d value of the key, repeated\n" % i for i in range(20000))
    for name, size in (("state", 50_000), ("memory", 4 * MIB), ("kernel", 600_000),
                       ("initramfs", 100_000), ("disk", 2 * MIB)):  # fmt: skip
        path = directory / name
        with path.open("wb") as f:
            f.truncate(size)
            f.write(os.urandom(size) if name == "kernel" else line[:size])
            if name == "memory":
                f.seek(3 * MIB)
                f.write(line[: 512 * 1024])
        files[name] = path
    pkg = directory / "t.drft"
    config = PackageConfig(4, 1, "console=ttyS0", "02:00:00:00:00:01")
    write_package(pkg, config, files, pack=pack)  # type: ignore[arg-type]
    return pkg


def test_the_pack_holds_every_chunk_that_compresses_and_unpacks_to_it(tmp_path: Path) -> None:
    package = text_package(tmp_path)
    pkg = open_package(package)
    index = pkg.read_index()
    members = member_bytes(package)
    with tarfile.open(package) as tar:
        info = tar.getmember(PACK_MEMBER)
        assert (info.offset_data, info.size) == (
            index.members["pack"].offset, index.members["pack"].size
        )  # fmt: skip
    assert index.has_pack and index.members["pack"].size > 0
    data = package.read_bytes()
    packed = 0
    for r in DATA:
        places = index.pack_places(r)
        for i, n in enumerate(index.packed[r]):
            size = chunk_length(len(members[r]), index.chunk_size, i)
            chunk = members[r][i * index.chunk_size : i * index.chunk_size + size]
            if index.hashes[r][i] == ZERO_HASH or r == "kernel":
                assert n == 0, (r, i)  # zeros and random bytes are not packed
                continue
            assert 0 < n < size
            assert unpack(data[places[i] : places[i] + n], size, DCTX) == chunk
            packed += n
    assert packed == index.members["pack"].size
    # The members are whole beside it: the runner reads them in place, as before.
    (tmp_path / "x").mkdir()
    plain = open_package(text_package(tmp_path / "x", pack=False))
    same = {r: b for r, b in member_bytes(plain.path).items() if r != "kernel"}
    assert same == {r: b for r, b in members.items() if r != "kernel"}
    assert not plain.read_index().has_pack


def read_all(package: Path) -> tuple[ObjectSource, dict[str, bytes], HostileServer]:
    """Every chunk of ``package`` through an ObjectSource from an HTTP object server."""
    with HostileServer() as server:
        server.put("t.drft", package.read_bytes())

        async def go() -> tuple[ObjectSource, dict[str, bytes]]:
            source = ObjectSource(server.url + "t.drft", options=FAST)
            await source.connect()
            return source, await fetch_all(source)

        source, got = asyncio.run(go())
    return source, got, server


def test_an_object_reader_takes_packed_runs_from_the_pack(tmp_path: Path) -> None:
    package = text_package(tmp_path)
    source, got, server = read_all(package)
    assert got == member_bytes(package)
    # fewer bytes crossed than the chunks hold: the text came compressed
    assert source.stats.wire_bytes < source.stats.bytes / 3
    pack = open_package(package).read_index().members["pack"]
    starts = [int(r[2].split("=")[1].split("-")[0]) for r in server.requests if r[2]]
    in_pack = [at for at in starts if at >= pack.offset]
    assert in_pack  # runs of packed chunks were ranges of the pack


def test_a_package_without_a_pack_is_read_from_its_members(tmp_path: Path) -> None:
    package = text_package(tmp_path, pack=False)
    source, got, _ = read_all(package)
    assert got == member_bytes(package)
    assert source.stats.wire_bytes == source.stats.bytes


def _first_packed(package: Path, resource: str) -> tuple[int, int, int, int]:
    """(chunk index, frame offset, frame length, chunk length) of ``resource``'s first
    packed chunk."""
    index = open_package(package).read_index()
    size = index.members[resource].size
    for i, n in enumerate(index.packed[resource]):
        if n:
            return i, index.pack_places(resource)[i], n, chunk_length(size, index.chunk_size, i)
    raise AssertionError("nothing packed")


def _fetch_one(server: HostileServer, resource: str, i: int) -> None:
    async def go() -> None:
        source = ObjectSource(server.url + "t.drft", options=FAST)
        await source.connect()
        await source.fetch_run(resource, i, 1, Priority.DEMAND, [None], lambda *a: None)

    asyncio.run(go())


def test_a_flipped_byte_in_a_packed_chunk_is_refused(tmp_path: Path) -> None:
    package = text_package(tmp_path)
    i, at, n, _ = _first_packed(package, "memory")
    with HostileServer() as server:
        server.put("t.drft", package.read_bytes())
        server.fault(Fault.FLIP_BYTE, offset=at + n // 2)
        with pytest.raises(VerificationError, match=f"chunk {i} of memory") as e:
            _fetch_one(server, "memory", i)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("forgery", ["bomb", "no-size", "shorter", "garbage"])
def test_a_forged_frame_of_the_same_length_is_refused(tmp_path: Path, forgery: str) -> None:
    """The index (sealed) fixes each frame's length; a store can still put any bytes
    there. A frame that declares more than its chunk (a bomb), none, less, or is not
    zstd at all is refused before anything is unpacked past the chunk's size."""
    package = text_package(tmp_path)
    i, at, n, size = _first_packed(package, "memory")
    if forgery == "bomb":
        frame = zstandard.ZstdCompressor().compress(bytes(64 * MIB))  # 64 MiB of zeros
    elif forgery == "no-size":
        frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * size)
    elif forgery == "shorter":
        frame = zstandard.ZstdCompressor().compress(b"y" * (size - 1))
    else:
        frame = os.urandom(n)
    assert len(frame) <= n
    data = bytearray(package.read_bytes())
    data[at : at + n] = frame.ljust(n, b"\0")
    with HostileServer() as server:
        server.put("t.drft", bytes(data))
        with pytest.raises(VerificationError, match=f"chunk {i} of memory") as e:
            _fetch_one(server, "memory", i)
    assert "\n" not in str(e.value)


def test_unpack_never_makes_more_than_the_chunk() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(8 * MIB))
    with pytest.raises(UnpackError, match="another size"):
        unpack(bomb, 256 * 1024, DCTX)
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(8 * MIB))
    with pytest.raises(UnpackError):
        unpack(streamed, 256 * 1024, DCTX)
    with pytest.raises(UnpackError, match="not a valid zstd frame"):
        unpack(b"not zstd at all", 256 * 1024, DCTX)


def _reindexed(index: PackageIndex) -> bytes:
    index.head_size = 0
    return index.to_bytes(None)


def test_an_index_whose_pack_lengths_lie_is_refused(tmp_path: Path) -> None:
    """Each check on the lengths, with an index whose digest is right (what a reader
    without a token accepts): the lengths themselves must make sense."""
    package = text_package(tmp_path)
    good = open_package(package).read_index()
    assert parse_index(_reindexed(good), "x", None, None).packed == good.packed

    zero = next(i for i, h in enumerate(good.hashes["memory"]) if h == ZERO_HASH)
    bad = open_package(package).read_index()
    bad.packed["memory"][zero] = 10  # a zero chunk is never fetched, so never packed
    with pytest.raises(DrafterError, match="bad pack length"):
        parse_index(_reindexed(bad), "x", None, None)

    bad = open_package(package).read_index()
    i = next(i for i, n in enumerate(bad.packed["memory"]) if n)
    bad.packed["memory"][i] = bad.chunk_size  # as long as the chunk: not compressed
    with pytest.raises(DrafterError, match="bad pack length"):
        parse_index(_reindexed(bad), "x", None, None)

    bad = open_package(package).read_index()
    bad.packed["memory"][i] -= 1  # the frames no longer fill the pack
    with pytest.raises(DrafterError, match="do not fill the pack"):
        parse_index(_reindexed(bad), "x", None, None)

    bad = open_package(package).read_index()
    del bad.members["pack"]  # version 1 with lengths: the hash table's size is wrong
    bad.packed = {}
    raw = bytearray(_reindexed(bad))
    assert parse_index(bytes(raw), "x", None, None).packed == {}


def test_version_and_pack_member_go_together(tmp_path: Path) -> None:
    package = make_package(tmp_path)
    index = open_package(package).read_index()
    assert index.has_pack
    body = index.to_bytes(None)
    text = body.replace(b'"version":%d' % PACKED_VERSION, b'"version":1')
    assert text != body

    forged = text[:-32] + blake3.blake3(text[:-32]).digest()  # a right digest
    with pytest.raises(DrafterError, match="a pack goes with version 2"):
        parse_index(forged, "x", None, None)


def test_a_run_of_packed_and_unpacked_chunks_goes_in_requests_at_once(tmp_path: Path) -> None:
    """Chunks that alternate between packed and not are stretches of two places (the
    pack, the member): they are all in flight at once, not one round trip each."""
    files = {}
    text = b"".join(b"line %06d of text that compresses\n" % i for i in range(30000))
    chunk = 256 * 1024
    memory = b"".join(os.urandom(chunk) if i % 2 else text[:chunk] for i in range(8))
    for name, data in (("state", b"s" * 5000), ("memory", memory), ("kernel", b"k" * 5000),
                       ("initramfs", b"i" * 5000), ("disk", b"d" * 5000)):  # fmt: skip
        (tmp_path / name).write_bytes(data)
        files[name] = tmp_path / name
    package = tmp_path / "t.drft"
    write_package(package, PackageConfig(2, 1, "console=ttyS0", "02:00:00:00:00:01"), files)  # type: ignore[arg-type]
    packed = open_package(package).read_index().packed["memory"]
    assert [n > 0 for n in packed] == [i % 2 == 0 for i in range(8)]
    with HostileServer() as server:
        server.put("t.drft", package.read_bytes())

        async def go() -> tuple[bytes, int]:
            source = ObjectSource(server.url + "t.drft", options=FAST)
            await source.connect()
            inflight, peak = 0, 0
            real = source._read_once

            async def counted(offset: int, length: int):  # noqa: ANN202
                nonlocal inflight, peak
                inflight += 1
                peak = max(peak, inflight)
                try:
                    await asyncio.sleep(0.05)  # a round trip
                    return await real(offset, length)
                finally:
                    inflight -= 1

            source._read_once = counted  # type: ignore[method-assign]
            buf = bytearray(len(memory))

            def keep(i: int, data, digest: bytes) -> None:  # noqa: ANN001
                buf[i * chunk : i * chunk + len(data)] = data

            await source.fetch_run("memory", 0, 8, Priority.DEMAND, [None] * 8, keep)
            return bytes(buf), peak

        got, peak = asyncio.run(go())
    assert got == memory
    assert peak == 8  # every stretch at once
