"""The package index (src/drafter/index.py) without a VM: what write_package records
in it (chunk hashes, member places, the hot set, the MAC), how a reader checks it,
how parse_index stands up to hostile bytes, and add_index on older packages.

Every expectation is computed here independently of the writer: chunk hashes with
blake3 over the test's own bytes, member places with Python's tarfile and GNU tar.
write_package costs about a second of CPU per package (its tar headers), so the
packages are built once per module and shared.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest

from drafter import package as package_module
from drafter.chunks import HASH_SIZE, PAGE, RESOURCES, ZERO_HASH, chunk_count
from drafter.device import Device
from drafter.errors import DrafterError
from drafter.hashes import file_hashes
from drafter.index import (
    DATA,
    INDEX_CHUNK_SIZE,
    INDEX_MEMBER,
    MAC_SIZE,
    MAGIC,
    MAX_CHUNK,
    MAX_JSON,
    MIN_CHUNK,
    PACK_MEMBER,
    MemberPlace,
    PackageIndex,
    index_key,
    parse_index,
    seal,
)
from drafter.package import (
    HOT_MEMBER,
    ChunkHasher,
    HotRanges,
    PackageConfig,
    Source,
    add_index,
    hot_chunks,
    member_name,
    open_package,
    write_package,
)
from support.common import TMP_PREFIX

MIB = 1 << 20
CHUNK = INDEX_CHUNK_SIZE
TOKEN = "drft1_biSHlX-mFo3kcSufZM_YXyRgtnngOLiM8Wqn0Zyh3a1sF3Wk"  # as drafter-token makes them
KEY = index_key(TOKEN)
OTHER_KEY = index_key(TOKEN + "x")
HEAD = struct.Struct("<8sI")


def config() -> PackageConfig:
    return PackageConfig(1, 1, "console=ttyS0", "02:00:00:00:00:01")


# The hot set of the main package: memory chunks 0, 3, then 1 (0 again is no news);
# the disk's last, short chunk.
HOT: HotRanges = {
    "memory": [(0, 4096), (3 * CHUNK, 1), (CHUNK - 1, 2)],
    "disk": [(2 * MIB, 12345)],
}
HOT_CHUNKS = {"memory": [0, 3, 1], "disk": [8]}


# -- independent expectations ----------------------------------------------------------


def expected_hashes(data: bytes, chunk_size: int) -> list[bytes]:
    """BLAKE3 of each chunk, ZERO_HASH for an all-zero one: computed here, not with
    the project's hashing."""
    out = []
    for start in range(0, len(data), chunk_size):
        piece = data[start : start + chunk_size]
        out.append(ZERO_HASH if piece.count(0) == len(piece) else blake3.blake3(piece).digest())
    return out


def refused(call: Callable[[], object], origin: str) -> DrafterError:
    """The project's error, in one line naming ``origin`` (errors from the index carry
    no code: DrafterError itself is the contract)."""
    try:
        call()
    except DrafterError as e:
        message = str(e)
        assert type(e) is DrafterError, type(e)
        assert "\n" not in message and message.startswith(f"{origin}: "), message
        return e
    raise AssertionError("accepted")


def tar_places(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each member, as Python's tarfile reads them."""
    with tarfile.open(path) as tar:
        return [(info.name, info.offset_data, info.size) for info in tar]


def member_of(resource: str) -> str:
    return {"hot": HOT_MEMBER, "pack": PACK_MEMBER}.get(resource) or member_name(resource)


def check_against_tar(path: Path, index: PackageIndex) -> None:
    """The index's member places are the tar's, the index is the first member and the
    rest follow in the seed's order (the hot member and the pack last)."""
    places = tar_places(path)
    names = [name for name, _, _ in places]
    want = [INDEX_MEMBER, *map(member_name, RESOURCES)]
    if "hot" in index.members:
        want.append(HOT_MEMBER)
    if "pack" in index.members:
        want.append(PACK_MEMBER)
    assert names == want
    by_name = {name: (offset, size) for name, offset, size in places}
    assert {member_of(r): (m.offset, m.size) for r, m in index.members.items()} == {
        name: by_name[name] for name in want[1:]
    }
    pkg = open_package(path)
    assert pkg.index is not None
    assert (pkg.index.offset, pkg.index.size) == by_name[INDEX_MEMBER]
    assert pkg.index.offset == 4096  # the first data block on the first 4 KiB boundary
    for resource, member in pkg.members.items():
        assert (member.offset, member.size) == by_name[member_name(resource)]


def check_hashes(path: Path, index: PackageIndex, contents: dict[str, bytes]) -> None:
    """Every data member's bytes in the package are ``contents``, and its hashes in the
    index are those of its chunks: computed here and by file_hashes on the package."""
    assert set(index.hashes) == set(DATA)
    fd = os.open(path, os.O_RDONLY)
    try:
        for resource in DATA:
            place = index.members[resource]
            assert place.size == len(contents[resource]), resource
            assert os.pread(fd, place.size, place.offset) == contents[resource], resource
            want = expected_hashes(contents[resource], index.chunk_size)
            assert len(want) == chunk_count(place.size, index.chunk_size)
            assert index.hashes[resource] == want, resource
            on_disk = file_hashes(fd, place.offset, place.size, index.chunk_size)
            assert on_disk == want, resource
    finally:
        os.close(fd)


# -- the packages, built once -----------------------------------------------------------


@dataclass
class Built:
    directory: Path
    files: dict[str, Path]  # the sources of the data members
    contents: dict[str, bytes]  # their bytes
    plain: Path  # written by write_package, unsigned, with HOT
    plain_index: PackageIndex  # what write_package returned
    signed: Path  # a copy of plain that add_index sealed with KEY
    signed_digest: str  # what add_index returned


def sparse_file(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> bytes:
    """A file of ``size`` bytes, holes but for ``pieces``; its bytes."""
    buf = bytearray(size)
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
            buf[offset : offset + len(data)] = data
    return bytes(buf)


def make_sources(directory: Path) -> tuple[dict[str, Path], dict[str, bytes]]:
    rng = random.Random(7)

    def noise(n: int) -> bytes:
        return rng.randbytes(n)

    layout: dict[str, tuple[int, list[tuple[int, bytes]]]] = {
        # less than one chunk
        "state": (70_001, [(0, noise(70_001))]),
        # 1 MiB (the config's memory_mib), four chunks: data at the start, a hole,
        # zeros written as data, a hole with bytes on its first and last byte.
        "memory": (
            MIB,
            [
                (0, noise(5000)),
                (2 * CHUNK, bytes(CHUNK)),
                (3 * CHUNK, b"\x01"),
                (MIB - 5, b"last!"),
            ],
        ),
        # three chunks, the last one short
        "kernel": (600_001, [(0, noise(600_001))]),
        "initramfs": (0, []),  # a 0-byte resource: no chunk at all
        # holes but for bytes across the boundary of chunks 0 and 1 and at the end of
        # its short last chunk
        "disk": (2 * MIB + 12345, [(CHUNK - 3, b"XYZ123"), (2 * MIB + 12338, noise(7))]),
    }
    files, contents = {}, {}
    for resource, (size, pieces) in layout.items():
        files[resource] = directory / resource
        contents[resource] = sparse_file(files[resource], size, pieces)
    return files, contents


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    directory = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    try:
        files, contents = make_sources(directory)
        plain = directory / "plain.drft"
        sources: dict[str, Source | Path] = dict(files)  # type: ignore[arg-type]
        index = write_package(plain, config(), sources, HOT)
        signed = directory / "signed.drft"
        shutil.copyfile(plain, signed)
        digest = add_index(signed, KEY)
        yield Built(directory, files, contents, plain, index, signed, digest)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- 1. chunk hashes --------------------------------------------------------------------


def test_index_hashes_are_every_chunks_blake3(built: Built) -> None:
    """Short last chunks, holes, zeros written as data and a 0-byte member."""
    index = open_package(built.plain).read_index()
    assert index == built.plain_index
    assert index.chunk_size == CHUNK and not index.signed
    check_hashes(built.plain, index, built.contents)
    memory = index.hashes["memory"]
    assert memory[1] == memory[2] == ZERO_HASH and ZERO_HASH not in (memory[0], memory[3])
    assert index.hashes["initramfs"] == [] and index.members["initramfs"].size == 0
    assert len(index.hashes["kernel"]) == 3 and len(index.hashes["disk"]) == 9
    assert index.config_digest == blake3.blake3(open_package(built.plain).read("config")).digest()


def test_the_package_stays_sparse(built: Built) -> None:
    """Hashing on the way does not write the holes (nor zeros written as data)."""
    probe = built.directory / "probe"
    sparse_file(probe, 3 * MIB, [(2 * MIB, b"x")])
    fd = os.open(probe, os.O_RDONLY)
    try:
        if os.lseek(fd, 0, os.SEEK_DATA) != 2 * MIB:
            pytest.skip("this file system does not report holes")
    finally:
        os.close(fd)
    place = built.plain_index.members["memory"]
    fd = os.open(built.plain, os.O_RDONLY)
    try:
        # the next data after chunk 0's 5000 bytes is chunk 3's first byte
        after = os.lseek(fd, place.offset + 8192, os.SEEK_DATA)
    finally:
        os.close(fd)
    assert after == place.offset + 3 * CHUNK


# -- 2. a Device as a source (its bytes through copy_sparse's sink) ----------------------


def test_device_sources_are_hashed_as_their_current_bytes(built: Built, tmp_path: Path) -> None:
    """Memory with a package's member as its base and writes in its overlay, a disk
    with no base; 64 KiB device chunks under 12 KiB index chunks (neither divides
    the other), so runs of base and overlay and the 1 MiB sink pieces cut index
    chunks anywhere."""
    pkg = open_package(built.plain)
    rng = random.Random(11)
    memory = Device("memory", MIB, pkg.range("memory"), tmp_path / "memory.overlay")
    disk = Device("disk", 3 * MIB + 777, None, tmp_path / "disk.overlay")
    try:
        memory.write(3 * 65536 + 10, rng.randbytes(5000))  # copies the base chunk first
        memory.write(0, bytes(65536))  # zeros over the base's data: chunk 0 is zero now
        memory.write(12288 * 20 - 1, b"ab")  # across an index chunk boundary
        memory.write(MIB - 3, b"end")  # over the base's "last!"
        disk.write(1, b"x")
        disk.write(MIB - 100, rng.randbytes(MIB + 200))  # over the 1 MiB sink pieces
        disk.write(3 * MIB + 776, b"z")  # the last byte
        want = {
            "state": built.contents["state"],
            "memory": memory.read(0, MIB),
            "kernel": built.contents["kernel"],
            "initramfs": b"",
            "disk": disk.read(0, disk.size),
        }
        assert want["memory"][:65536] == bytes(65536) and want["memory"][-5:] == b"laend"
        path = tmp_path / "device.drft"
        sources: dict[str, Source | Path] = {
            "state": built.files["state"],
            "memory": memory,
            "kernel": built.files["kernel"],
            "initramfs": built.files["initramfs"],
            "disk": disk,
        }
        written = write_package(path, config(), sources, chunk_size=3 * PAGE)
    finally:
        memory.close()
        disk.close()
    index = open_package(path).read_index()
    assert index == written and index.chunk_size == 3 * PAGE and index.hot == {}
    check_hashes(path, index, want)
    check_against_tar(path, index)
    assert index.hashes["memory"][:5] == [ZERO_HASH] * 5


# -- ChunkHasher, the sink write_package hashes with -------------------------------------


def test_chunk_hasher_matches_the_bytes_it_wrote(tmp_path: Path) -> None:
    """Random ascending pieces with gaps (holes) and zero runs, at a base offset."""
    rng = random.Random(3)
    for case in range(20):
        chunk_size = rng.choice([PAGE, 3 * PAGE, 16 * PAGE])
        size = rng.randrange(0, 6 * chunk_size)
        base = rng.choice([0, 512, 4096 * 3])
        buf = bytearray(size)
        path = tmp_path / f"out{case}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            hasher = ChunkHasher(fd, base, size, chunk_size)
            pos = 0
            while pos < size:
                pos += rng.choice([0, rng.randrange(1, chunk_size + 1)])  # a gap, maybe
                n = min(size - pos, rng.randrange(1, 2 * chunk_size))
                if n <= 0:
                    break
                data = bytes(n) if rng.random() < 0.3 else rng.randbytes(n)
                hasher(base + pos, data)
                buf[pos : pos + n] = data
                pos += n
            hashes = hasher.finish()
            os.ftruncate(fd, base + size)
            assert os.pread(fd, size, base) == buf
        finally:
            os.close(fd)
        assert hashes == expected_hashes(bytes(buf), chunk_size), case


def test_chunk_hasher_refuses_bytes_out_of_place(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    try:
        hasher = ChunkHasher(fd, 4096, 3 * PAGE, PAGE)
        with pytest.raises(DrafterError):
            hasher(4095, b"x")  # before the member
        with pytest.raises(DrafterError):
            hasher(4096 + 3 * PAGE - 1, b"xy")  # past its end
        hasher(4096 + 2 * PAGE, b"x")
        with pytest.raises(DrafterError):
            hasher(4096, b"x")  # a chunk already hashed
    finally:
        os.close(fd)


# -- 3. member places -----------------------------------------------------------------


def test_member_places_are_the_tars(built: Built) -> None:
    index = open_package(built.plain).read_index()
    assert set(index.members) == {*RESOURCES, "hot", "pack"}
    check_against_tar(built.plain, index)
    check_against_tar(built.signed, open_package(built.signed).read_index(KEY))


def test_gnu_tar_lists_the_index_first_and_reads_the_members(built: Built) -> None:
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("no tar")
    listed = subprocess.run(
        [tar, "tf", str(built.plain)], capture_output=True, text=True, check=True, timeout=30
    ).stdout.splitlines()
    assert listed == [INDEX_MEMBER, *map(member_name, RESOURCES), HOT_MEMBER, PACK_MEMBER]
    kernel = subprocess.run(
        [tar, "xOf", str(built.plain), member_name("kernel")],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    assert kernel == built.contents["kernel"]
    index = subprocess.run(
        [tar, "xOf", str(built.plain), INDEX_MEMBER], capture_output=True, check=True, timeout=30
    ).stdout
    assert parse_index(index, "tar", None, None) == built.plain_index


def test_hot_set_is_recorded_as_chunk_indices(built: Built) -> None:
    assert built.plain_index.hot == HOT_CHUNKS
    assert open_package(built.plain).read_index().hot == HOT_CHUNKS
    assert open_package(built.signed).read_index(KEY).hot == HOT_CHUNKS


# -- 4. signed and pinned indexes -------------------------------------------------------


def test_a_signed_index_needs_its_key(built: Built) -> None:
    signed = open_package(built.signed)
    origin = str(built.signed)
    index = signed.read_index(KEY)
    assert index.signed
    assert index.hashes == built.plain_index.hashes
    assert signed.index_digest() == built.signed_digest
    refused(lambda: signed.read_index(OTHER_KEY), origin)
    refused(lambda: signed.read_index(), origin)  # without the token
    refused(lambda: signed.read_index(OTHER_KEY, bytes.fromhex(built.signed_digest)), origin)
    # A pin is the whole member's digest: it checks a signed index as well.
    assert signed.read_index(pin=bytes.fromhex(built.signed_digest)).signed
    # A token holder accepts only a MAC made with the token: an unsigned index (which
    # anyone can make, e.g. a store stripping the signature) is refused.
    refused(lambda: open_package(built.plain).read_index(KEY), str(built.plain))


def test_a_forger_cannot_turn_a_signed_index_into_an_unsigned_one(built: Built) -> None:
    pkg = open_package(built.signed)
    assert pkg.index is not None
    with built.signed.open("rb") as f:
        f.seek(pkg.index.offset)
        head, hashes = split(f.read(pkg.index.size))
    assert head["signed"] is True
    head["signed"] = False
    for forged in (build(head, hashes), build(head, hashes, OTHER_KEY)):
        refused(lambda forged=forged: parse_index(forged, "store", KEY, None), "store")
    # A reader without the token cannot tell (its remedy is the pin).
    assert not parse_index(build(head, hashes), "store", None, None).signed


def test_an_unsigned_index_and_its_pin(built: Built) -> None:
    pkg = open_package(built.plain)
    origin = str(built.plain)
    pin = bytes.fromhex(pkg.index_digest())
    assert pkg.index is not None
    with built.plain.open("rb") as f:
        f.seek(pkg.index.offset)
        assert blake3.blake3(f.read(pkg.index.size)).digest() == pin
    assert pkg.read_index(pin=pin) == built.plain_index
    refused(lambda: pkg.read_index(pin=bytes(32)), origin)
    refused(lambda: pkg.read_index(pin=pin[:-1] + bytes([pin[-1] ^ 1])), origin)
    refused(lambda: pkg.read_index(pin=pin[:16]), origin)


def test_an_older_package_has_no_index_to_read(built: Built, tmp_path: Path) -> None:
    old = old_package(tmp_path / "old.drft", built)
    pkg = open_package(old)
    assert pkg.index is None
    for call in (pkg.read_index, pkg.index_digest):
        with pytest.raises(DrafterError) as e:
            call()
        assert type(e.value) is DrafterError and str(e.value).startswith(str(old))


# -- 5. hostile input to parse_index ----------------------------------------------------


def synthetic_index(chunk_size: int = PAGE) -> PackageIndex:
    """An index as write_package would make it, with small members: 31 hashes."""
    rng = random.Random(5)
    sizes = {"config": 300, "state": 5000, "memory": 65536, "kernel": 10001,
             "initramfs": 0, "disk": 40000, "hot": 50}  # fmt: skip
    members, offset = {}, 8192
    for name, size in sizes.items():
        members[name] = MemberPlace(offset, size)
        offset += (size + 4095) // 4096 * 4096 + 4096
    hashes = {
        r: [ZERO_HASH if rng.random() < 0.3 else rng.randbytes(32)
            for _ in range(chunk_count(sizes[r], chunk_size))]
        for r in DATA
    }  # fmt: skip
    return PackageIndex(chunk_size, members, rng.randbytes(32), hashes,
                        {"memory": [3, 0, 15], "disk": [9]})  # fmt: skip


GOOD = synthetic_index()
GOOD_BYTES = GOOD.to_bytes(None)


def split(data: bytes) -> tuple[dict, bytes]:
    """The JSON head (as a dict) and the hash bytes of an index."""
    _, n = HEAD.unpack_from(data)
    return json.loads(data[HEAD.size : HEAD.size + n]), data[HEAD.size + n : -MAC_SIZE]


def build(
    head: object,
    hashes: bytes,
    key: bytes | None = None,
    magic: bytes = MAGIC,
    json_len: int | None = None,
) -> bytes:
    """An index of this head (a JSON value, or raw bytes) and hashes, sealed validly:
    so that the checks past the MAC are the ones tested."""
    text = head if isinstance(head, bytes) else json.dumps(head).encode()
    body = HEAD.pack(magic, len(text) if json_len is None else json_len) + text + hashes
    return body + seal(body, key)


def check_sane(index: PackageIndex) -> None:
    """What a reader relies on in an index that parse_index accepted."""
    assert MIN_CHUNK <= index.chunk_size <= MAX_CHUNK and index.chunk_size % PAGE == 0
    assert set(RESOURCES) <= set(index.members) <= {*RESOURCES, "hot", "pack"}
    spans = sorted((m.offset, m.offset + m.size) for m in index.members.values())
    for m in index.members.values():
        assert type(m.offset) is int and type(m.size) is int and m.offset >= 0 and m.size >= 0
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert len(index.config_digest) == HASH_SIZE
    for r in DATA:
        assert len(index.hashes[r]) == chunk_count(index.members[r].size, index.chunk_size)
        assert all(len(h) == HASH_SIZE for h in index.hashes[r])
    for r, chunks in index.hot.items():
        count = chunk_count(index.members[r].size, index.chunk_size)
        assert r in DATA and all(type(i) is int and 0 <= i < count for i in chunks)


class Outcomes:
    """Runs hostile cases: each must be refused with DrafterError or parse into a sane
    index, quickly; anything else is collected and reported at the end."""

    def __init__(self) -> None:
        self.bad: list[str] = []
        self.refused = self.accepted = 0
        self.slowest = 0.0

    def run(
        self, label: str, data: bytes, key: bytes | None = None, pin: bytes | None = None,
        must_refuse: bool = False,
    ) -> None:  # fmt: skip
        start = time.monotonic()
        try:
            index = parse_index(data, "origin", key, pin)
        except DrafterError as e:
            self.refused += 1
            if "\n" in str(e) or not str(e).startswith("origin: "):
                self.bad.append(f"{label}: message {str(e)[:200]!r}")
        except Exception as e:  # noqa: BLE001 - what must never escape
            self.bad.append(f"{label}: {type(e).__name__}: {str(e)[:200]}")
        else:
            self.accepted += 1
            if must_refuse:
                self.bad.append(f"{label}: accepted")
            try:
                check_sane(index)
            except AssertionError:
                self.bad.append(f"{label}: accepted an index that is not sane")
        self.slowest = max(self.slowest, time.monotonic() - start)

    def check(self) -> None:
        assert not self.bad, f"{len(self.bad)} bad outcomes: {self.bad[:10]}"
        assert self.slowest < 1.0, self.slowest


@pytest.fixture
def outcomes() -> Iterator[Outcomes]:
    tracemalloc.start()
    try:
        out = Outcomes()
        yield out
        out.check()
        _, peak = tracemalloc.get_traced_memory()
        assert peak < 64 * MIB, peak  # nothing sized by what the bytes claim
    finally:
        tracemalloc.stop()


def test_the_synthetic_index_is_good() -> None:
    index = parse_index(GOOD_BYTES, "origin", None, None)
    assert index == GOOD and not index.signed
    check_sane(index)
    assert len(GOOD_BYTES) == GOOD.size()
    assert parse_index(build(*split(GOOD_BYTES)), "origin", None, None) == GOOD
    signed = copy.deepcopy(GOOD).to_bytes(KEY)
    assert parse_index(signed, "origin", KEY, None).signed


def test_truncated_at_every_offset(outcomes: Outcomes, built: Built) -> None:
    """As read (its digest then fails), resealed (the parser sees the cut) and pinned."""
    pkg = open_package(built.plain)
    assert pkg.index is not None
    with built.plain.open("rb") as f:
        f.seek(pkg.index.offset)
        real = f.read(pkg.index.size)
    for name, data in (("synthetic", GOOD_BYTES), ("package", real)):
        for n in range(len(data)):
            cut = data[:n]
            outcomes.run(f"{name} cut at {n}", cut, must_refuse=True)
            outcomes.run(f"{name} cut at {n}, pinned", cut, pin=blake3.blake3(cut).digest(),
                         must_refuse=True)  # fmt: skip
            if n >= MAC_SIZE:
                body = cut[:-MAC_SIZE]
                outcomes.run(f"{name} cut at {n}, resealed", body + seal(body, None),
                             must_refuse=True)  # fmt: skip
    assert outcomes.refused > 3 * len(GOOD_BYTES)


def test_flipped_bytes(outcomes: Outcomes) -> None:
    """A fixed seed: flips anywhere, unsealed (the digest catches them), resealed and
    signed (the parser must refuse or accept something sane)."""
    rng = random.Random(20261203)
    signed = copy.deepcopy(GOOD).to_bytes(KEY)
    for case in range(400):
        mode = case % 4
        data = bytearray(signed if mode == 3 else GOOD_BYTES)
        # flips mostly in the head, where the structure is
        for _ in range(rng.randrange(1, 5)):
            at = rng.randrange(len(data) if rng.random() < 0.3 else 512)
            data[at] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        raw = bytes(data)
        label = f"flip case {case} mode {mode}"
        if mode == 0:
            outcomes.run(label, raw, must_refuse=raw != GOOD_BYTES)
        elif mode == 1:
            outcomes.run(label, raw[:-MAC_SIZE] + seal(raw[:-MAC_SIZE], None))
        elif mode == 2:
            outcomes.run(label, raw, pin=blake3.blake3(raw).digest())
        else:
            outcomes.run(label, raw[:-MAC_SIZE] + seal(raw[:-MAC_SIZE], KEY), key=KEY)
            outcomes.run(label + " (other key)", raw, key=OTHER_KEY, must_refuse=True)
    assert outcomes.accepted > 0 and outcomes.refused > 200


DELETE = object()


def hostile_heads() -> Iterator[tuple[str, object]]:
    """(label, head) pairs, each a valid head with one field made wrong."""
    good, _ = split(GOOD_BYTES)
    count = {r: chunk_count(GOOD.members[r].size, GOOD.chunk_size) for r in DATA}

    def variant(label: str, path: tuple[object, ...], value: object) -> tuple[str, object]:
        doc = copy.deepcopy(good)
        node = doc
        for step in path[:-1]:
            node = node[step]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return label, doc

    for value in (0, 2, -1, None, "1", [1], {}, 1.5, DELETE):
        yield variant(f"version {value!r}", ("version",), value)
    for value in (0, -PAGE, PAGE - 1, PAGE + 1, 2 * PAGE + 7, MAX_CHUNK + PAGE, 2**62,
                  2**64, 10**400, -(10**400), "4096", 4096.0, True, None, [], DELETE):  # fmt: skip
        yield variant(f"chunk_size {str(value)[:30]}", ("chunk_size",), value)
    for value in ([], "x", None, 0, {}, DELETE):
        yield variant(f"members {value!r}", ("members",), value)
    for name in RESOURCES:
        yield variant(f"members without {name}", ("members", name), DELETE)
    for name in ("index", "evil", "../config", ""):
        yield variant(f"member {name!r} added", ("members", name), [1 << 40, 1])
    for value in ("x", None, [], [1], [1, 2, 3], [-1, 10], [10, -1], ["0", 10], [0, "10"],
                  [0.0, 10], [0, 10.0], [True, 10], [0, False], [2**61, 1], [0, 2**51],
                  [2**64, 0], [None, None], {"0": 1}):  # fmt: skip
        for name in ("config", "memory", "initramfs", "hot"):
            yield variant(f"{name} at {value!r}", ("members", name), value)
    memory = good["members"]["memory"]
    kernel = good["members"]["kernel"]
    yield variant("memory overlaps the state", ("members", "memory"),
                  [good["members"]["state"][0] + 1, memory[1]])  # fmt: skip
    yield variant("kernel inside memory", ("members", "kernel"),
                  [memory[0] + 4096, kernel[1]])  # fmt: skip
    yield variant("hot inside disk", ("members", "hot"), [good["members"]["disk"][0] + 10, 50])
    yield variant("config where memory is", ("members", "config"), [memory[0], 300])
    for value in ("", "zz" * 32, "00" * 31, "00" * 33, 5, None, ["00" * 32], DELETE):
        yield variant(f"config_blake3 {str(value)[:20]}", ("config_blake3",), value)
    for value in ([], "x", None, 0, DELETE):
        yield variant(f"hot {value!r}", ("hot",), value)
    for name in ("config", "hot", "evil", "index"):
        yield variant(f"hot for {name}", ("hot", name), [0])
    for value in (0, "0", None, {}, [-1], [count["memory"]], [0, count["memory"] + 5], [True],
                  [0.0], ["0"], [None], [[0]], [2**70], [-(2**70)]):  # fmt: skip
        yield variant(f"hot memory {value!r}", ("hot", "memory"), value)
    yield variant("hot for the 0-byte initramfs", ("hot", "initramfs"), [0])
    yield variant("hot past the disk's last chunk", ("hot", "disk"), [count["disk"]])


def test_hostile_heads_are_refused(outcomes: Outcomes) -> None:
    """Each field of the head made wrong in turn; sealed, so only the checks stop it."""
    _, hashes = split(GOOD_BYTES)
    cases = list(hostile_heads())
    assert len(cases) > 100
    for label, head in cases:
        outcomes.run(label, build(head, hashes), must_refuse=True)
        outcomes.run(label + " (signed)", build(head, hashes, KEY), key=KEY, must_refuse=True)
    assert outcomes.accepted == 0


def test_random_fields_never_break_the_parser(outcomes: Outcomes) -> None:
    """A fixed seed: random values in random places of the head."""
    rng = random.Random(99)
    good, hashes = split(GOOD_BYTES)
    values: list[object] = [None, True, False, -1, 0, 1, 2**31, 2**64, -(2**63), 1.5, 1e308,
                            "", "x", "00" * 32, [], {}, [0], [0, 1], [[0, 1]], {"a": 1},
                            [-1, 1], [0, 0], [4096, 2**50]]  # fmt: skip
    for case in range(400):
        doc = copy.deepcopy(good)
        for _ in range(rng.randrange(1, 4)):
            node: dict | list = doc
            while True:
                keys = list(node) if isinstance(node, dict) else list(range(len(node)))
                if not keys:
                    break
                step = rng.choice(keys)
                child = node[step]  # type: ignore[index]
                if isinstance(child, dict | list) and child and rng.random() < 0.6:
                    node = child
                    continue
                node[step] = copy.deepcopy(rng.choice(values))  # type: ignore[index]
                break
        extra = rng.choice([0, 0, 0, 32, -32, 1, -1])
        body_hashes = hashes + rng.randbytes(extra) if extra > 0 else hashes[: len(hashes) + extra]
        outcomes.run(f"random fields {case}", build(doc, body_hashes))


def test_hostile_framing_is_refused(outcomes: Outcomes) -> None:
    good, hashes = split(GOOD_BYTES)
    text = json.dumps(good).encode()
    cases: list[tuple[str, bytes]] = [
        ("bad magic", build(good, hashes, magic=b"DRFTIDX2")),
        ("no magic", build(good, hashes, magic=bytes(8))),
        ("JSON length past the end", build(text, hashes, json_len=len(text) + len(hashes) + 1)),
        ("JSON length 2**32-1", build(text, hashes, json_len=2**32 - 1)),
        ("JSON length over MAX_JSON", build(text, hashes, json_len=MAX_JSON + 1)),
        ("JSON length 0", build(text, hashes, json_len=0)),
        ("JSON length cuts the JSON", build(text, hashes, json_len=len(text) - 1)),
        ("JSON length takes a hash in", build(text, hashes, json_len=len(text) + 32)),
        ("a hash too many", build(good, hashes + bytes(32))),
        ("a hash too few", build(good, hashes[:-32])),
        ("a byte too many", build(good, hashes + b"\x01")),
        ("a byte too few", build(good, hashes[:-1])),
        ("no hashes", build(good, b"")),
        ("the MAC only", seal(b"", None)),
        ("44 zero bytes", bytes(HEAD.size + MAC_SIZE)),
        ("44 bytes sealed", build(b"", b"")),
        ("empty", b""),
    ]
    for label, head in [
        ("a list", b"[]"), ("a string", b'"x"'), ("a number", b"1"), ("null", b"null"),
        ("true", b"true"), ("NaN", b"NaN"), ("invalid UTF-8", b'{"a": "\xff\xfe"}'),
        ("garbage", b"\x00\x01\x02"), ("nested 50 deep", b"[" * 50 + b"]" * 50),
        ("nested 100000 deep", b"[" * 100_000), ("a huge integer", b"1" * 5000),
        ("spaces", b" " * 1000), ("an unclosed object", text[:-1]),
        ("trailing data", text + b"x"),
    ]:  # fmt: skip
        cases.append((f"head {label}", build(head, hashes)))
        cases.append((f"head {label}, signed", build(head, hashes, KEY)))
    for label, data in cases:
        outcomes.run(label, data, must_refuse=True)
        outcomes.run(label + " with a key", data, key=KEY, must_refuse=True)
        outcomes.run(label + " pinned", data, pin=blake3.blake3(data).digest(), must_refuse=True)
    # json.loads takes UTF-16 and UTF-32 too (the writer writes UTF-8): accepted, so
    # only sane, as it decodes to a good head.
    for encoding in ("utf-16", "utf-16-be", "utf-32"):
        outcomes.run(encoding, build(json.dumps(good).encode(encoding), hashes))


def test_a_deeply_nested_head_with_a_bad_digest_is_refused() -> None:
    text = b"[" * 100_000
    data = HEAD.pack(MAGIC, len(text)) + text + bytes(MAC_SIZE)  # not its digest
    refused(lambda: parse_index(data, "origin", None, None), "origin")


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_the_integer_1(version: object) -> None:
    good, hashes = split(GOOD_BYTES)
    good["version"] = version
    refused(lambda: parse_index(build(good, hashes), "origin", None, None), "origin")


def signed_size_trigger() -> PackageIndex:
    """An index whose unsigned head JSON is one byte past a 512-byte boundary: the
    signed one ("signed":true is a byte shorter) needs a 512-byte block less."""
    for n in range(1, 400):  # each one-digit entry adds 2 bytes, each two-digit one 3
        for m in range(2):
            index = synthetic_index()
            index.hot = {"memory": [5] * n + [12] * m}
            text = index.head()[HEAD.size :].rstrip(b" ")
            if (len(text) + HEAD.size) % 512 == 1:
                return index
    raise AssertionError("no hot set triggers it")


def test_a_signed_index_is_as_long_as_it_was_laid_out() -> None:
    index = signed_size_trigger()
    laid_out = index.size()  # what write_package reserves for the member
    data = index.to_bytes(KEY)
    member = data.ljust(laid_out, b"\0")  # the rest of the member is the file's zeros
    assert parse_index(member, "origin", KEY, None).signed
    assert len(data) == laid_out


# -- 6. add_index ---------------------------------------------------------------------


def old_package(path: Path, built: Built, hot: bool = True) -> Path:
    """A package as drafter wrote it before the index: a plain tar (by Python's
    tarfile: 512-byte, not 4 KiB alignment) of the seed's members in its order, the
    config without sizes."""
    cfg = json.loads(config().to_json())
    del cfg["sizes"]
    members = [(member_name("config"), json.dumps(cfg).encode())]
    members += [(member_name(r), built.contents[r]) for r in RESOURCES[1:]]
    if hot:
        hot_json = {r: [list(x) for x in v] for r, v in HOT.items()}
        members.append((HOT_MEMBER, json.dumps(hot_json).encode()))
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, _BytesReader(data))
    return path


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out, self.pos = self.data[self.pos : end], min(end, len(self.data))
        return out


def members_bytes(path: Path) -> dict[str, bytes]:
    pkg = open_package(path)
    return {r: pkg.read(r) for r in pkg.members}


def test_add_index_to_an_older_package(built: Built, tmp_path: Path) -> None:
    """The result is the package write_package makes from the same members."""
    old = old_package(tmp_path / "old.drft", built)
    before = open_package(old)
    assert before.index is None and before.hot == HOT
    with old.open("rb") as f:
        old_bytes = f.read()
        digest = add_index(old, None)
        f.seek(0)
        assert f.read() == old_bytes  # replaced, not rewritten: an open reader is unaffected
    after = open_package(old)
    assert after.index_digest() == digest
    index = after.read_index(pin=bytes.fromhex(digest))
    check_hashes(old, index, built.contents)
    check_against_tar(old, index)
    assert index.hot == HOT_CHUNKS and after.hot == HOT
    data = members_bytes(old)
    assert {r: data[r] for r in DATA} == {r: built.contents[r] for r in DATA}
    assert after.config == open_package(built.plain).config
    assert old.read_bytes() == built.plain.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.drft"]  # no temporary left


def test_add_index_to_a_package_that_has_one(built: Built, tmp_path: Path) -> None:
    """It is written anew, sealed with the key given (the fixture: plain -> signed);
    the members stay byte for byte, the hot set too; without a key it is unsigned
    again, identical to write_package's."""
    assert members_bytes(built.signed) == members_bytes(built.plain)
    signed = open_package(built.signed)
    assert signed.hot == HOT and signed.read_index(KEY).hot == HOT_CHUNKS
    again = tmp_path / "again.drft"
    shutil.copyfile(built.signed, again)
    digest = add_index(again)  # the old key is not needed to replace the index
    assert again.read_bytes() == built.plain.read_bytes()
    assert digest == open_package(built.plain).index_digest()


def test_add_index_leaves_a_truncated_package_untouched(built: Built, tmp_path: Path) -> None:
    disk = open_package(built.plain).members["disk"]
    for name, cut in (("in-disk", disk.offset + 100), ("in-index", 6000), ("header", 100)):
        path = tmp_path / f"{name}.drft"
        with built.plain.open("rb") as src, path.open("wb") as dst:
            dst.write(src.read(cut))
        before = path.read_bytes()
        refused(lambda path=path: add_index(path, KEY), str(path))
        assert path.read_bytes() == before
    assert len(list(tmp_path.iterdir())) == 3  # no temporary left


def test_add_index_failing_midway_leaves_the_package_untouched(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.drft"
    shutil.copyfile(built.signed, path)
    before = path.read_bytes()

    def full(self: ChunkHasher) -> list[bytes]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(package_module.ChunkHasher, "finish", full)
    with pytest.raises(DrafterError, match=str(path)):
        add_index(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.drft"]


# -- 7. hot_chunks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ranges", "chunks"),
    [
        ([(0, 1)], [0]),
        ([(0, PAGE)], [0]),
        ([(PAGE - 1, 1)], [0]),
        ([(PAGE - 1, 2)], [0, 1]),
        ([(PAGE, PAGE)], [1]),
        ([(PAGE, PAGE + 1)], [1, 2]),
        ([(PAGE + 1, PAGE - 1)], [1]),
        ([(0, 10 * PAGE)], [0, 1, 2, 3, 4]),  # clipped at the resource's end
        ([(4 * PAGE, 1)], [4]),  # the short last chunk
        ([(5 * PAGE - 101, 100)], [4]),  # its last byte (size is 5 pages - 100)
        ([(5 * PAGE - 100, 1)], []),  # the first byte past the end
        ([(9 * PAGE, 5)], []),  # well past it
        ([(PAGE, 0)], []),  # empty
        ([(3 * PAGE, 1), (0, 1), (3 * PAGE + 5, PAGE)], [3, 0, 4]),  # first touched first
        ([(2 * PAGE, 1), (2 * PAGE + 1, 1)], [2]),
    ],
)
def test_hot_chunks_at_the_boundaries(ranges: list[tuple[int, int]], chunks: list[int]) -> None:
    sizes = {"config": 100, "memory": 5 * PAGE - 100, "disk": 0}
    assert hot_chunks({"memory": ranges}, PAGE, sizes) == ({"memory": chunks} if chunks else {})


def test_hot_chunks_skips_what_has_no_chunks() -> None:
    sizes = {"config": 100, "memory": MIB, "disk": 0}
    hot = {"config": [(0, 10)], "disk": [(0, 10)], "evil": [(0, 1)], "memory": [(CHUNK, CHUNK)]}
    assert hot_chunks(hot, CHUNK, sizes) == {"memory": [1]}


def test_hot_chunks_against_a_byte_map() -> None:
    """A fixed seed: the chunks that share a byte with some range (their intervals
    intersect), in the order the ranges first reach them."""
    rng = random.Random(17)
    for _ in range(200):
        chunk_size = rng.choice([PAGE, 3 * PAGE, CHUNK])
        size = rng.randrange(1, 8 * chunk_size)
        ranges = [(rng.randrange(0, size + chunk_size), rng.randrange(0, 3 * chunk_size))
                  for _ in range(rng.randrange(1, 6))]  # fmt: skip
        want: list[int] = []
        for offset, length in ranges:
            end = min(offset + length, size)  # the bytes [offset, end) of the resource
            for c in range(chunk_count(size, chunk_size)):
                if max(offset, c * chunk_size) < min(end, (c + 1) * chunk_size) and c not in want:
                    want.append(c)
        got = hot_chunks({"disk": ranges}, chunk_size, {"disk": size})
        assert got == ({"disk": want} if want else {}), (chunk_size, size, ranges)
        assert all(0 <= c < chunk_count(size, chunk_size) for c in want)
