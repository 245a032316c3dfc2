"""Writing a package to object storage, never seen half done.

A package bound for ``s3://BUCKET/KEY`` is written to a spool file on this host first
(the writer hashes it as it goes, :func:`drafter.package.write_package`), then sent as
one multipart upload: S3 shows the object only once the upload completes, so a reader
sees the old object or the new one. With ``if_absent`` the upload is conditional
(``If-None-Match: *``) and refuses to replace an existing object. HTTP servers are
read-only here: a package for a web server or CDN is uploaded with their own tools.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drafter.errors import DrafterError
from drafter.objects.location import (
    CREDENTIALS_HELP,
    ObjectLocation,
    StoreOptions,
    first_line,
    is_object_url,
    open_store,
    parse_location,
)

log = logging.getLogger(__name__)

PART_SIZE = 16 << 20
PARTS_IN_FLIGHT = 8
SPOOL_DIR = Path("out/spool")


@dataclass
class PackageOutput:
    """Where a command writes a package: a local path, or an object (through a spool
    file that :meth:`publish` uploads and removes)."""

    target: str
    if_absent: bool = False
    options: StoreOptions = field(default_factory=StoreOptions)
    spool_dir: Path = SPOOL_DIR

    def __post_init__(self) -> None:
        self.location: ObjectLocation | None = None
        if is_object_url(self.target):
            self.location = parse_location(self.target, "--package-output-path")
            if self.location.scheme != "s3":
                raise DrafterError(
                    "--package-output-path: an http(s) server is read-only here; write "
                    "the package to a file or s3:// and publish it with the server's tools"
                )
            name = Path(self.location.key).name or "package.drft"
            self.local = self.spool_dir / f".{name}.{os.getpid()}.spool"
        else:
            self.local = Path(self.target)

    @property
    def remote(self) -> bool:
        return self.location is not None

    async def check(self) -> None:
        """Before any work: refuse at once if ``if_absent`` and the target exists, and
        reach the store (credentials, bucket) so a bad setting costs no VM run."""
        if self.location is None:
            if self.if_absent and self.local.exists():
                raise DrafterError(f"{self.local} exists (--if-absent): not replacing it")
            return
        import obstore
        from obstore import exceptions as e

        self.spool_dir.mkdir(parents=True, exist_ok=True)
        store = open_store(self.location, self.options)
        try:
            await obstore.head_async(store, self.location.key)
        except (e.NotFoundError, FileNotFoundError):
            return
        except Exception as error:
            raise _error(self.location, error) from None
        if self.if_absent:
            raise DrafterError(f"{self.location} exists (--if-absent): not replacing it")

    async def publish(self) -> None:
        """Upload the spool file to the object, then remove it (nothing for a local
        target: it was written in place)."""
        if self.location is None:
            return
        try:
            await upload(self.local, self.location, self.if_absent, self.options)
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the spool file, if any (after a failure too)."""
        if self.location is not None:
            self.local.unlink(missing_ok=True)


async def upload(
    path: Path, location: ObjectLocation, if_absent: bool, options: StoreOptions
) -> None:
    """Send the file at ``path`` to ``location`` as one multipart upload."""
    import obstore

    store = open_store(location, options)
    size = path.stat().st_size
    start = time.monotonic()
    mode: Any = "create" if if_absent else "overwrite"
    try:
        await obstore.put_async(
            store,
            location.key,
            path,
            mode=mode,
            use_multipart=size > PART_SIZE,
            chunk_size=PART_SIZE,
            max_concurrency=PARTS_IN_FLIGHT,
        )
    except Exception as error:
        raise _error(location, error) from None
    took = time.monotonic() - start
    log.info("uploaded %d MiB to %s in %.1fs", size >> 20, location, took)


def _error(location: ObjectLocation, error: Exception) -> DrafterError:
    from obstore import exceptions as e

    if isinstance(error, (e.AlreadyExistsError, e.PreconditionError)):
        return DrafterError(f"{location} exists (--if-absent): not replacing it")
    if isinstance(error, (e.PermissionDeniedError, e.UnauthenticatedError)):
        return DrafterError(f"{location}: the store refused the credentials: {CREDENTIALS_HELP}")
    if isinstance(error, DrafterError):
        return error
    return DrafterError(f"cannot write {location}: {first_line(error)}")
