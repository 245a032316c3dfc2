"""Fakes for the lease's state machine (src/drafter/checkpoint/lease.py): records in
memory with the same conditions as S3, per-client views that can lose the store (a
partition), and simulated time so that hours of renewals run in milliseconds."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field

from drafter.checkpoint.records import Record, RecordConflict
from drafter.objects.source import StoreError


@dataclass
class MemoryStore:
    """What every view sees: name -> (data, version)."""

    objects: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    writes: list[tuple[str, str]] = field(default_factory=list)  # (client, name) in order

    def view(self, client: str) -> MemoryRecords:
        return MemoryRecords(self, client)


class MemoryRecords:
    """One client's :class:`~drafter.checkpoint.records.Records` on a MemoryStore;
    ``away`` makes every call fail as a store that cannot be reached."""

    def __init__(self, store: MemoryStore, client: str) -> None:
        self.store = store
        self.client = client
        self.where = f"mem://{client}/"
        self.away = False

    def _reach(self) -> None:
        if self.away:
            raise StoreError(f"{self.where}: the store cannot be reached")

    def _write(self, name: str, data: bytes) -> str:
        version = f'"{next(self.store.versions)}"'
        self.store.objects[name] = (bytes(data), version)
        self.store.writes.append((self.client, name))
        return version

    async def read(self, name: str) -> Record | None:
        self._reach()
        found = self.store.objects.get(name)
        return Record(*found) if found else None

    async def create(self, name: str, data: bytes) -> str:
        self._reach()
        if name in self.store.objects:
            raise RecordConflict(f"{name} exists")
        return self._write(name, data)

    async def replace(self, name: str, data: bytes, version: str) -> str:
        self._reach()
        found = self.store.objects.get(name)
        if found is None or found[1] != version:
            raise RecordConflict(f"{name} is not version {version}")
        return self._write(name, data)

    async def put(self, name: str, data: bytes) -> None:
        self._reach()
        self._write(name, data)

    async def get(self, name: str, limit: int | None = None) -> bytes | None:
        self._reach()
        found = self.store.objects.get(name)
        if found and limit is not None and len(found[0]) > limit:
            raise StoreError(f"{name} is too large", lasting=True)
        return found[0] if found else None

    async def get_range(self, name: str, offset: int, length: int) -> bytes | None:
        self._reach()
        found = self.store.objects.get(name)
        if found is None:
            return None
        data = found[0][offset : offset + length]
        if len(data) != length:
            raise StoreError(f"{name}: a short range answer", lasting=True)
        return data

    async def delete(self, name: str) -> None:
        self._reach()
        self.store.objects.pop(name, None)

    async def list(self, prefix: str) -> list[str]:
        self._reach()
        return sorted(n for n in self.store.objects if n.startswith(prefix))


class FakeTime:
    """A clock and a sleep for the code under test; :meth:`run` drives the tasks,
    jumping the clock to the next sleeper's wake-up whenever every task waits."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._seq), future))
        await future

    async def run(self, until: float, done: asyncio.Future[object] | None = None) -> None:
        """Advance to ``until`` (or until ``done`` is done), letting every task run
        between jumps."""
        while True:
            for _ in range(20):  # let ready tasks run to their next sleep
                await asyncio.sleep(0)
            if done is not None and done.done():
                return
            if not self._sleepers or self._sleepers[0][0] > until:
                self.now = max(self.now, until)
                return
            wake, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, wake)
            if not future.done():
                future.set_result(None)
