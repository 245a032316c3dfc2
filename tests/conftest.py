"""What both tiers need: a temporary directory per test, and real object stores on
loopback (SeaweedFS's S3, nginx over HTTP or HTTPS; support/objectstores.py).

The tiers' own set-up is in ``unit/conftest.py`` (nothing but the ``unit`` marker) and
``vm/conftest.py`` (blueprints, the host network, QEMU machines, packages). Shared
helpers are in ``support/``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from drafter.devicefs import unmount_stale_under
from drafter.transport import localtoken
from support.common import TMP_PREFIX
from support.objectstores import Nginx, NginxFactory, SeaweedS3

BUCKET = "drafter"  # the bucket the seaweed fixture creates


@pytest.fixture(scope="session", autouse=True)
def local_token_file() -> Iterator[Path]:
    """The host-local token of this session (per xdist worker): the servers the tests
    start without a token ask for it, the project's clients read it, in a directory
    only root may enter (docs/security.md). Removed at the session's end."""
    path = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    before = os.environ.get(localtoken.LOCAL_TOKEN_ENV)
    os.environ[localtoken.LOCAL_TOKEN_ENV] = str(path / "drafter" / "local-token")
    try:
        yield path / "drafter" / "local-token"
    finally:
        if before is None:
            os.environ.pop(localtoken.LOCAL_TOKEN_ENV, None)
        else:
            os.environ[localtoken.LOCAL_TOKEN_ENV] = before
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A temporary directory removed after the test (pytest's tmp_path is kept)."""
    path = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    try:
        yield path
    finally:
        # A process killed on purpose (SIGKILL) leaves its FUSE mount behind.
        unmount_stale_under(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 endpoint for the session (per xdist worker), with the bucket
    "drafter" made; killed at the session's end, also after a failure. Tests share it:
    each uses keys of its own."""
    path = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    server = SeaweedS3(path / "seaweed")
    try:
        server.start()
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nginx_factory() -> Iterator[NginxFactory]:
    """``nginx_factory(root, tls=False)`` starts an nginx serving ``root`` read-only
    and returns it (``.url``, ``.ca_pem`` with tls, ``.stop()``, ``.restart()``); every
    one is stopped after the test."""
    path = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    servers: list[Nginx] = []

    def start(root: Path, tls: bool = False, rate: str | None = None) -> Nginx:
        server = Nginx(root, path / f"nginx-{len(servers)}", tls=tls, rate=rate)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(path, ignore_errors=True)
