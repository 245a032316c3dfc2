"""Small records in a store, written with conditions: the lease and the head of a
VM's checkpoints (``s3://BUCKET/PREFIX/lease``, ``.../head``) and the objects beside
them.

A :class:`Records` store offers what the lease and the checkpoint commits need and
nothing more: read a record with its version (the ETag), create it only if absent
(S3 ``If-None-Match: *``), replace it only if it is still the version read
(``If-Match``), and plain puts and listings for content-addressed objects. A failed
condition is :class:`RecordConflict`: someone else wrote first, which for a lease
means this holder was replaced. A store that cannot be reached is
:class:`~drafter.objects.source.StoreError` (not ``lasting``): the caller decides how
long to keep trying.

:class:`ObjectRecords` is the S3 implementation (obstore); an etcd one would fit the
same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from drafter.errors import DrafterError
from drafter.objects.location import (
    ObjectLocation,
    StoreOptions,
    open_store,
    parse_location,
)
from drafter.objects.source import StoreError, store_failure

MAX_RECORD = 1 << 20  # a lease or head record is small; anything larger is refused


class RecordConflict(DrafterError):
    """A conditional write failed: the record exists, or is not the version read."""


@dataclass(frozen=True)
class Record:
    data: bytes
    version: str  # the store's ETag


class Records(Protocol):
    """Conditional writes of small records, and plain objects, under one prefix."""

    where: str  # for messages: s3://BUCKET/PREFIX/

    async def read(self, name: str) -> Record | None:
        """The record and its version, or None if there is none."""
        ...

    async def create(self, name: str, data: bytes) -> str:
        """Write ``name`` only if it does not exist; its new version."""
        ...

    async def replace(self, name: str, data: bytes, version: str) -> str:
        """Write ``name`` only if it is still ``version``; its new version."""
        ...

    async def put(self, name: str, data: bytes) -> None:
        """Write ``name`` whatever is there (content-addressed objects)."""
        ...

    async def get(self, name: str, limit: int | None = None) -> bytes | None:
        """An object's bytes, or None if it does not exist; StoreError (lasting) if it
        is larger than ``limit``."""
        ...

    async def get_range(self, name: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes of an object from ``offset`` (exactly; StoreError, lasting,
        if it answers fewer), or None if it does not exist."""
        ...

    async def delete(self, name: str) -> None:
        """Remove ``name`` (nothing if it is not there)."""
        ...

    async def list(self, prefix: str) -> list[str]:
        """Names under ``prefix`` (relative to this store's prefix)."""
        ...


class ObjectRecords:
    """:class:`Records` in an S3 bucket under a prefix (``s3://BUCKET/PREFIX``)."""

    def __init__(self, url: str | ObjectLocation, options: StoreOptions | None = None) -> None:
        location = url if isinstance(url, ObjectLocation) else parse_location(url, "--checkpoint")
        if location.scheme != "s3":
            raise DrafterError(f"{location}: checkpoints need an S3 store (s3://BUCKET/PREFIX)")
        self.location = location
        self.prefix = location.key.strip("/") + "/"
        self.where = f"s3://{location.root}/{self.prefix}"
        self._store: Any = open_store(location, options or StoreOptions())

    def _key(self, name: str) -> str:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise DrafterError(f"{name!r} is not a record name")
        return self.prefix + name

    def _error(self, error: Exception, name: str) -> DrafterError:
        from obstore import exceptions as e

        where = self.where + name
        if isinstance(error, (e.PreconditionError, e.AlreadyExistsError)):
            return RecordConflict(f"{where} was written by someone else first")
        return store_failure(error, where)

    async def read(self, name: str) -> Record | None:
        import obstore
        from obstore import exceptions as e

        try:
            result = await obstore.get_async(self._store, self._key(name))
            meta = result.meta
            if int(meta["size"]) > MAX_RECORD:
                raise StoreError(f"{self.where}{name} is too large for a record", lasting=True)
            data = bytes(await result.bytes_async())
        except (e.NotFoundError, FileNotFoundError):
            return None
        except Exception as error:
            raise self._error(error, name) from None
        version = meta.get("e_tag")
        if not version:
            raise StoreError(f"{self.where}: the store gives no ETag", lasting=True)
        return Record(data, version)

    async def _put(self, name: str, data: bytes, mode: Any) -> str:
        import obstore

        try:
            result = await obstore.put_async(self._store, self._key(name), data, mode=mode)
        except Exception as error:
            raise self._error(error, name) from None
        version = result.get("e_tag")
        if not version:
            raise StoreError(f"{self.where}: the store gives no ETag", lasting=True)
        return str(version)

    async def create(self, name: str, data: bytes) -> str:
        return await self._put(name, data, "create")

    async def replace(self, name: str, data: bytes, version: str) -> str:
        return await self._put(name, data, {"e_tag": version})

    async def put(self, name: str, data: bytes) -> None:
        await self._put(name, data, "overwrite")

    async def get(self, name: str, limit: int | None = None) -> bytes | None:
        import obstore
        from obstore import exceptions as e

        try:
            result = await obstore.get_async(self._store, self._key(name))
            if limit is not None and int(result.meta["size"]) > limit:
                raise StoreError(f"{self.where}{name} is larger than it can be", lasting=True)
            data = bytes(await result.bytes_async())
        except (e.NotFoundError, FileNotFoundError):
            return None
        except Exception as error:
            raise self._error(error, name) from None
        if limit is not None and len(data) > limit:
            raise StoreError(f"{self.where}{name} is larger than it can be", lasting=True)
        return data

    async def get_range(self, name: str, offset: int, length: int) -> bytes | None:
        import obstore
        from obstore import exceptions as e

        try:
            data = bytes(
                await obstore.get_range_async(
                    self._store, self._key(name), start=offset, length=length
                )
            )
        except (e.NotFoundError, FileNotFoundError):
            return None
        except Exception as error:
            raise self._error(error, name) from None
        if len(data) != length:
            raise StoreError(f"{self.where}{name}: a short range answer", lasting=True)
        return data

    async def delete(self, name: str) -> None:
        import obstore
        from obstore import exceptions as e

        try:
            await obstore.delete_async(self._store, self._key(name))
        except (e.NotFoundError, FileNotFoundError):
            return
        except Exception as error:
            raise self._error(error, name) from None

    async def list(self, prefix: str) -> list[str]:
        import obstore

        names: list[str] = []
        try:
            stream = obstore.list(self._store, self._key(prefix) if prefix else self.prefix)
            async for batch in stream:
                for meta in batch:
                    path = str(meta["path"])
                    if path.startswith(self.prefix):
                        names.append(path[len(self.prefix) :])
        except Exception as error:
            raise self._error(error, prefix) from None
        return sorted(names)
