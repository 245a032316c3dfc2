"""The unit tier: no root, no QEMU, no network namespace, no FUSE mount, no blueprint.

Servers and clients here talk over 127.0.0.1 only. Every test below this directory
gets the ``unit`` marker (``pytest -m unit`` selects the tier, as does
``pytest tests/unit``).

``scripts/test --fast`` runs the tier on several workers, a module per worker at a time
(pytest-xdist, ``--dist loadfile --no-loadscope-reorder``): the tests of a module never
run beside each other. The longest module, test_server_limits.py (whose tests measure
time and CPU use), goes first, so that its worker starts on it at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FIRST = HERE / "test_server_limits.py"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.unit)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike
        items.sort(key=lambda item: item.path != FIRST)
