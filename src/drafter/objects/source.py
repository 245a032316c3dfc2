"""A package in object storage as a :class:`~drafter.chunks.ChunkSource`: range reads
of one object, every chunk verified against the package's index.

:meth:`ObjectSource.connect` reads the object's first 256 KiB, which tell its size
and version (its ETag) and hold the index's tar header (:mod:`drafter.index`) and
usually the whole index and config: one request, at most two more for a large index.
Every later range read is pinned to that ETag (``If-Match``): a replaced object fails
the read, it is never mixed in. A run of chunks is one range request (all-zero chunks
are never fetched); each chunk is checked against its hash in the index before it is
handed on. At most :data:`INFLIGHT` requests are in flight, and of those that are not
demands no more bytes than keep the link full (:mod:`drafter.objects.slots`); a
request that waits for a slot goes in priority order (demand, prefetch, background).

The store client retries timeouts, 5xx answers, throttling and cut connections with
backoff for ``retry_timeout`` seconds per request; after that the fetch fails with one
line, unless :attr:`ObjectSource.keep_trying` is set (a peer sets it once its VM has
resumed): then a store that stays away stalls the fetch, which tries again with backoff
until the store is back, since failing it would fail the running VM's reads. A lasting
refusal (a missing object, refused credentials, a replaced object, bytes that fail
verification) fails at once either way. Nothing an answer claims is believed: its
length, its range and its bytes are checked.

With a :class:`~drafter.chunkcache.ChunkCache`, a chunk the host already has (from
another VM of the same package, or an earlier run) is taken from it, verified, and not
fetched; every chunk fetched is kept there.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import tarfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import zstandard

from drafter.chunkcache import ChunkCache
from drafter.chunks import ZERO_HASH, ChunkData, Deliver, Priority, chunk_length
from drafter.errors import DrafterError
from drafter.hashes import digest
from drafter.index import ADD_INDEX, DATA, FIRST_READ, INDEX_MEMBER, MAX_INDEX_SIZE, parse_index
from drafter.objects.location import (
    CREDENTIALS_HELP,
    ObjectLocation,
    StoreOptions,
    first_line,
    open_store,
    parse_location,
)
from drafter.objects.slots import Budget, RequestSlots
from drafter.pack import UnpackError, unpack
from drafter.package import MAX_CONFIG_SIZE
from drafter.transport.inflight import ClientStats, VerificationError

if TYPE_CHECKING:
    from drafter.metrics import Metrics

log = logging.getLogger(__name__)

INFLIGHT = 32  # range requests in flight at most (those not demands also by bytes: slots.py)
MAX_RUN_BYTES = 8 << 20  # one range request carries at most this much
OUTAGE_BACKOFF = (1.0, 30.0)  # a running VM's fetch retries from 1 s, doubling to 30 s


class ObjectChanged(DrafterError):
    """The object was replaced after the start: its reads no longer match its ETag."""


class StoreError(DrafterError):
    """The store refused, failed or stayed away past the retries. ``lasting`` when
    trying again cannot help (no such object, refused credentials, a wrong answer)."""

    def __init__(self, message: str, *, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting


class ObjectSource:
    """One package object (``s3://`` or ``http(s)://``) as a chunk source."""

    def __init__(
        self,
        url: str | ObjectLocation,
        *,
        key: bytes | None = None,
        pin: bytes | None = None,
        options: StoreOptions | None = None,
        inflight: int = INFLIGHT,
        cache: ChunkCache | None = None,
    ) -> None:
        self.location = url if isinstance(url, ObjectLocation) else parse_location(url)
        self.raddr = str(self.location)
        self._key, self._pin = key, pin
        self._options = options or StoreOptions()
        self._store: Any = None
        self._etag: str | None = None
        self._size = 0
        self._offsets: dict[str, int] = {}
        self._packed: dict[str, list[int]] = {}  # chunk lengths in the pack (0: not in it)
        self._pack_at: dict[str, list[int]] = {}  # where each chunk's frame starts
        self._dctx = zstandard.ZstdDecompressor()
        self._slots = RequestSlots(inflight)
        self._budget = Budget()  # the non-demand bytes the slots let be in flight
        self._closed = False
        self.chunk_size = 0
        self.manifest: dict[str, int] = {}
        self.hashes: dict[str, list[bytes]] = {}
        self.hot: dict[str, list[int]] = {}
        self.config = b""
        self.stats = ClientStats()
        self.metrics: Metrics | None = None
        self.requests = 0  # range requests made
        self.cache = cache
        self.keep_trying = False  # a store outage stalls fetches instead of failing them
        self.outages = 0  # times the store stayed away past the client's retries
        self._outage_since: float | None = None

    @property
    def reconnects(self) -> int:
        return 0  # the store client keeps its own connections; retries are not counted

    async def connect(self) -> None:
        """Learn the object's version, read and check its index and config."""

        self._store = open_store(self.location, self._options)
        first = await self._read_first()
        if self._etag is None:
            log.warning("%s has no ETag: a replaced object shows only as chunks that "
                        "fail verification", self.raddr)  # fmt: skip
        name, offset, size = _first_member(first, self.raddr)
        if name != INDEX_MEMBER:
            raise DrafterError(
                f"{self.raddr} is a package without an index (written by an older "
                f"drafter): add one with `{ADD_INDEX} PACKAGE` and upload it again"
            )
        if size > MAX_INDEX_SIZE or offset + size > self._size:
            raise DrafterError(f"{self.raddr}: the package index is larger than the object")
        data = bytes(first[offset : offset + size])
        if len(data) < size:
            data += await self._read(offset + len(data), size - len(data))
        index = parse_index(data, self.raddr, self._key, self._pin)
        ends = [m.offset + m.size for m in index.members.values()]
        if max(ends) > self._size:
            raise DrafterError(f"{self.raddr}: the package index places members past its end")
        config = index.members["config"]
        if config.size > MAX_CONFIG_SIZE:
            raise DrafterError(f"{self.raddr}: the package config is too large")
        end = config.offset + config.size
        if end <= len(first):
            self.config = bytes(first[config.offset : end])
        else:
            self.config = bytes(await self._read(config.offset, config.size))
        if not hmac.compare_digest(digest(self.config), index.config_digest):
            raise VerificationError(f"{self.raddr}: the package config does not match its index")
        self.chunk_size = index.chunk_size
        self.manifest = {r: index.members[r].size for r in DATA}
        self._offsets = {r: index.members[r].offset for r in DATA}
        self.hashes = index.hashes
        self.hot = index.hot
        if index.has_pack:  # runs of packed chunks come from the pack, compressed
            self._packed = index.packed
            self._pack_at = {r: index.pack_places(r) for r in DATA}
        log.debug("%s: %d bytes, ETag %s, index of %d bytes, %d request(s)",
                  self.raddr, self._size, self._etag, size, self.requests)  # fmt: skip

    async def fetch_run(
        self,
        resource: str,
        start: int,
        count: int,
        priority: Priority | int,
        expected: Sequence[bytes | None],
        deliver: Deliver,
    ) -> None:
        """Chunks ``start`` .. ``start + count - 1`` of ``resource``, verified against
        the index (and ``expected``) and handed to ``deliver`` in order: stretches of
        non-zero chunks as one range request each (of the pack for packed chunks, of
        the member for the others), all in flight at once; zero chunks without a
        request. If a stretch fails, the others are still delivered, then its error
        is raised."""
        if self._closed or not self.chunk_size:
            raise DrafterError(f"{self.raddr} is not open")
        hashes = check_run(self.raddr, self.hashes, resource, start, count, expected)
        size = self.manifest[resource]
        stop = start + count
        per_request = max(1, MAX_RUN_BYTES // self.chunk_size)
        # In order: chunks at hand (zero or cached), or a stretch being fetched.
        plan: list[tuple[int, bytes] | asyncio.Task[list[tuple[int, ChunkData]]]] = []
        index = start
        while index < stop:
            if hashes[index] == ZERO_HASH:
                self.stats.zero_chunks += 1
                plan.append((index, bytes(chunk_length(size, self.chunk_size, index))))
                index += 1
                continue
            cached = self._cached(resource, index)
            if cached is not None:
                plan.append((index, cached))
                index += 1
                continue
            end = index + 1
            packed = self._is_packed(resource, index)
            while (
                end < stop
                and end - index < per_request
                and hashes[end] != ZERO_HASH
                and self._is_packed(resource, end) == packed
            ):
                cached = self._cached(resource, end)
                if cached is not None:
                    break
                end += 1
            fetch = self._fetch_stretch(resource, index, end, int(priority))
            plan.append(asyncio.ensure_future(fetch))
            if cached is not None:  # the chunk that ended the stretch, in order
                plan.append((end, cached))
                end += 1
            index = end
        failure: BaseException | None = None
        try:
            for step in plan:
                if isinstance(step, tuple):
                    deliver(step[0], step[1], hashes[step[0]])
                    continue
                try:
                    chunks = await step
                except DrafterError as e:
                    failure = failure or e
                    continue
                for i, chunk in chunks:
                    deliver(i, chunk, hashes[i])
        finally:  # (a deliver that raised leaves stretches behind: theirs are let go)
            for step in plan:
                if isinstance(step, tuple):
                    continue
                if not step.done():
                    step.cancel()
                elif not step.cancelled():
                    step.exception()  # retrieved: no "never retrieved" warning
        if failure is not None:
            raise failure

    def _cached(self, resource: str, index: int) -> bytes | None:
        """Chunk ``index`` from the host's cache, verified there, or None."""
        if self.cache is None:
            return None
        n = chunk_length(self.manifest[resource], self.chunk_size, index)
        data = self.cache.get(self.hashes[resource][index], n)
        if data is not None:
            self.stats.chunks += 1
            self.stats.bytes += n
        return data

    def _is_packed(self, resource: str, index: int) -> bool:
        lengths = self._packed.get(resource)
        return lengths is not None and lengths[index] > 0

    async def _fetch_stretch(
        self, resource: str, start: int, end: int, priority: int
    ) -> list[tuple[int, ChunkData]]:
        """Chunks ``start`` .. ``end - 1`` as one range request: of their member, or of
        the pack when they are packed (each frame unpacked, at most a chunk's size);
        each verified against the index."""
        size = self.manifest[resource]
        packed = self._is_packed(resource, start)
        if packed:
            offset = self._pack_at[resource][start]
            length = self._pack_at[resource][end - 1] + self._packed[resource][end - 1] - offset
        else:
            offset = self._offsets[resource] + start * self.chunk_size
            length = min(end * self.chunk_size, size) - start * self.chunk_size
        sent = time.monotonic()
        async with self._slots.slot(priority, length):
            data = await self._read(offset, length)
        seconds = time.monotonic() - sent
        view = memoryview(data)
        hashes = self.hashes[resource]
        chunks: list[ChunkData] = []
        for index in range(start, end):
            n = chunk_length(size, self.chunk_size, index)
            if packed:
                at = self._pack_at[resource][index] - offset
                frame = view[at : at + self._packed[resource][index]]
                try:
                    chunk: memoryview | bytes = unpack(frame, n, self._dctx)
                except UnpackError as e:
                    self.stats.verify_failures += 1
                    raise VerificationError(
                        f"chunk {index} of {resource} from {self.raddr}: {e}: refused it"
                    ) from None
                wire = len(frame)
            else:
                at = (index - start) * self.chunk_size
                chunk = view[at : at + n]
                wire = n
            chunks.append(chunk)
            if digest(chunk) != hashes[index]:
                self.stats.verify_failures += 1
                raise VerificationError(
                    f"chunk {index} of {resource} from {self.raddr} failed verification "
                    "(its bytes do not match the package index): refused it"
                )
            self.stats.chunks += 1
            self.stats.bytes += n
            self.stats.wire_bytes += wire
            if self.metrics is not None:
                self.metrics.chunk_pulled(resource, priority, n, wire, seconds)
        if self.cache is not None:
            await asyncio.to_thread(self._keep, resource, start, chunks)
        return list(zip(range(start, end), chunks, strict=True))

    def _keep(self, resource: str, start: int, chunks: list[ChunkData]) -> None:
        """Put verified chunks from ``start`` on into the cache."""
        assert self.cache is not None
        hashes = self.hashes[resource]
        for i, chunk in enumerate(chunks):
            self.cache.put(hashes[start + i], chunk)

    async def _read_first(self) -> memoryview:
        """The object's first :data:`FIRST_READ` bytes (fewer if it is smaller), its
        size and its version (ETag), in one request: no HEAD before it."""
        import obstore

        self.requests += 1
        sent = time.monotonic()
        try:
            result = await obstore.get_async(
                self._store, self.location.key, options={"range": (0, FIRST_READ)}
            )
            got, meta = result.range, result.meta
            data = memoryview(await result.bytes_async())
        except Exception as e:
            raise self._error(e, "cannot read") from None
        self._budget.arrived(len(data), time.monotonic() - sent)
        self._slots.budget = self._budget.bytes()
        self._size, self._etag = int(meta["size"]), meta.get("e_tag")
        want = (0, min(FIRST_READ, self._size))
        if tuple(got) != want or len(data) != want[1]:
            raise StoreError(
                f"{self.raddr} answered bytes {got[0]}-{got[1]} ({len(data)} bytes) to a "
                f"request for 0-{want[1]}: refused",
                lasting=True,
            )
        return data

    async def _read(self, offset: int, length: int) -> memoryview:
        """Bytes ``[offset, offset + length)`` of the object at its pinned version,
        exactly that many; StoreError, ObjectChanged or a short-answer error if not.
        With :attr:`keep_trying`, a store that stays away is waited for."""
        wait = OUTAGE_BACKOFF[0]
        while True:
            try:
                data = await self._read_once(offset, length)
            except StoreError as e:
                if e.lasting or not self.keep_trying or self._closed:
                    raise
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    self.outages += 1
                    log.warning("%s; the VM runs on the chunks it has, retrying", e)
                else:
                    log.debug("still away (%s); next try in %.0f s", e, wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, OUTAGE_BACKOFF[1])
                continue
            if self._outage_since is not None:
                log.warning("%s is back after %.0f s", self.raddr,
                            time.monotonic() - self._outage_since)  # fmt: skip
                self._outage_since = None
            return data

    async def _read_once(self, offset: int, length: int) -> memoryview:
        import obstore

        if self._closed:
            raise DrafterError(f"{self.raddr} is closed")
        options: Any = {"range": (offset, offset + length)}
        if self._etag is not None:
            options["if_match"] = self._etag
        self.requests += 1
        sent = time.monotonic()
        try:
            result = await obstore.get_async(self._store, self.location.key, options=options)
            got = result.range
            etag = result.meta.get("e_tag")
            data = memoryview(await result.bytes_async())
        except Exception as e:
            raise self._error(e, "cannot read") from None
        self._budget.arrived(len(data), time.monotonic() - sent)
        self._slots.budget = self._budget.bytes()
        if self._etag is not None and etag is not None and etag != self._etag:
            raise ObjectChanged(f"{self.raddr} was replaced during the start (its ETag changed)")
        if tuple(got) != (offset, offset + length) or len(data) != length:
            raise StoreError(
                f"{self.raddr} answered bytes {got[0]}-{got[1]} ({len(data)} bytes) to a "
                f"request for {offset}-{offset + length}: refused",
                lasting=True,
            )
        return data

    def _error(self, error: Exception, doing: str) -> DrafterError:
        """One line for a store client's error, with a class a caller can tell apart."""
        from obstore import exceptions as e

        if isinstance(error, e.PreconditionError):
            return ObjectChanged(f"{self.raddr} was replaced during the start (its ETag changed)")
        if isinstance(error, (e.NotFoundError, FileNotFoundError)):
            return StoreError(f"{self.raddr} does not exist", lasting=True)
        return store_failure(error, self.raddr, f"{doing} ")

    async def close(self) -> None:
        """Fetches after this fail; the store client's connections go with it."""
        self._closed = True
        self._store = None


def check_run(
    raddr: str,
    hashes: dict[str, list[bytes]],
    resource: str,
    start: int,
    count: int,
    expected: Sequence[bytes | None],
) -> list[bytes]:
    """A fetch_run's arguments checked against what the source lists (``hashes``):
    the resource's hashes. DrafterError for chunks it does not have,
    VerificationError where the caller expects another hash than it lists."""
    listed = hashes.get(resource)
    if listed is None:
        raise DrafterError(f"{raddr} has no resource named {resource!r}")
    if count < 1 or start < 0 or start + count > len(listed) or len(expected) != count:
        raise DrafterError(f"chunks {start}+{count} are not in {resource} of {raddr}")
    for i, want in enumerate(expected):
        if want is not None and want != listed[start + i]:
            raise VerificationError(f"chunk {start + i} of {resource}: {raddr} lists another hash")
    return listed


def store_failure(error: Exception, where: str, doing: str = "") -> DrafterError:
    """A store client's error as one line: refused credentials (lasting: they will
    be refused again), a DrafterError as it is, anything else a StoreError that
    trying again may cure. Callers map their own cases (a conflict, a missing
    object) first."""
    from obstore import exceptions as e

    if isinstance(error, (e.PermissionDeniedError, e.UnauthenticatedError)):
        return StoreError(
            f"{where}: the store refused the credentials: {CREDENTIALS_HELP}", lasting=True
        )
    if isinstance(error, DrafterError):
        return error
    return StoreError(f"{doing}{where}: {first_line(error)}")


def _first_member(head: memoryview, origin: str) -> tuple[str, int, int]:
    """The first tar member's name, data offset and size, from the object's start."""
    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(head)), mode="r:") as tar:
            info = tar.next()
    except (tarfile.TarError, EOFError):
        raise DrafterError(f"{origin} is not a drafter package (not a tar)") from None
    if info is None:
        raise DrafterError(f"{origin} is an empty tar, not a package")
    if info.size < 0 or not info.isfile():
        raise DrafterError(f"{origin}: the first member is not a regular file")
    return info.name, info.offset_data, info.size
