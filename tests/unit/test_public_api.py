"""The public API (``import drafter``): every name documented and typed, and light to
import. The runnable examples of docs/api.md are in tests/vm/test_api.py."""

from __future__ import annotations

import inspect
import subprocess
import sys

import drafter


def test_public_names_are_documented_and_typed() -> None:
    problems = []
    for name in drafter.__all__:
        obj = getattr(drafter, name)
        doc = inspect.getdoc(obj) or ""
        if not doc or doc.startswith(f"{name}("):  # a dataclass's made-up docstring
            problems.append(f"{name}: no docstring")
        functions = [(name, obj)] if inspect.isfunction(obj) else []
        if inspect.isclass(obj) and not issubclass(obj, Exception):
            for attr, value in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                func = value.fget if isinstance(value, property) else value
                func = getattr(func, "__func__", func)  # classmethod, staticmethod
                if inspect.isfunction(func):
                    functions.append((f"{name}.{attr}", func))
                    if attr != "__init__" and not inspect.getdoc(func):
                        problems.append(f"{name}.{attr}: no docstring")
        for where, func in functions:
            if func.__qualname__.endswith("_no_init_or_replace_init"):
                continue  # a Protocol's placeholder __init__
            sig = inspect.signature(func)
            for p in sig.parameters.values():
                if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty:
                    problems.append(f"{where}: parameter {p.name} has no type")
            if sig.return_annotation is inspect.Signature.empty and where.split(".")[-1] != (
                "__init__"
            ):
                problems.append(f"{where}: no return type")
    assert problems == [], "\n".join(problems)


def test_importing_drafter_stays_light() -> None:
    """The commands import ``drafter`` first: its public names load on first use."""
    code = (
        "import sys, drafter\n"
        "assert not {'drafter.vm', 'drafter.peer', 'drafter.package'} & set(sys.modules)\n"
        "assert set(drafter.__all__) <= set(dir(drafter))\n"
        "assert drafter.Peer.__module__.startswith('drafter.peer.')\n"  # the peer package
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
