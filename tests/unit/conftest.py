"""The unit tier: no root, no QEMU, no network namespace, no FUSE mount, no blueprint.

Servers and clients here talk over 127.0.0.1 only. Every test below this directory
gets the ``unit`` marker (``pytest -m unit`` selects the tier, as does
``pytest tests/unit``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.unit)
