"""The unit tier: no root, no QEMU, no network namespace, no FUSE mount, no blueprint.

Servers and clients here talk over 127.0.0.1 only. Every test below this directory
gets the ``unit`` marker (``pytest -m unit`` selects the tier, as does
``pytest tests/unit``).

``scripts/test --fast`` runs the tier on several workers (pytest-xdist, ``--dist
loadgroup``). Tests marked ``serial`` measure time or CPU use (or load the CPU
themselves): they share one xdist group, so they run one after another on one worker,
and they come first, so that the group's worker starts on them at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.unit)
            if item.get_closest_marker("serial"):
                item.add_marker(pytest.mark.xdist_group("serial"))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike
        items.sort(key=lambda item: item.get_closest_marker("serial") is None)
