"""What both tiers need: a temporary directory per test.

The tiers' own set-up is in ``unit/conftest.py`` (nothing but the ``unit`` marker) and
``vm/conftest.py`` (blueprints, the host network, QEMU machines, packages). Shared
helpers are in ``support/``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from drafter.devicefs import unmount_stale_under
from support.common import TMP_PREFIX


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
