"""docs/api.md runs as written: its four scripts package, resume, serve and migrate a
Redis VM through the public API only; and every public name is documented and typed."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from drafter.blueprint.builder import Blueprint
from support.common import CACHE, ROOT, stop_process
from support.net import free_port

if TYPE_CHECKING:  # pytest would try to collect a Test* class imported here
    from support.vms import TestNetwork

DOC = ROOT / "docs" / "api.md"
SCRIPT_TIMEOUT = 600


def scripts() -> dict[str, str]:
    """The doc's python blocks by the file name on their first line (``# name.py: ...``)."""
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.M | re.S)
    out = {}
    for block in blocks:
        name = re.match(r"# (\w+\.py):", block)
        assert name, f"a python block in {DOC} does not start with '# NAME.py:'"
        out[name.group(1)] = block
    return out


def with_settings(script: str, **settings: object) -> str:
    """The script with the settings at its top (``NAME = value``) replaced."""
    for name, value in settings.items():
        literal = f"Path({str(value)!r})" if isinstance(value, Path) else repr(value)
        line = f"{name} = {literal}"
        setting = re.compile(rf"^{name} = .*$", re.M)
        script, n = setting.subn(lambda _m, line=line: line, script, count=1)
        assert n == 1, f"no setting {name} in\n{script}"
    return script


def start(script: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, what: str, timeout: float = SCRIPT_TIMEOUT) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        out, err = proc.communicate()
    assert proc.returncode == 0, f"{what} failed:\n{out}\n{err}"
    return out


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = SCRIPT_TIMEOUT) -> str:
    """Read ``proc``'s stdout until a line holds ``needle``; what was read so far."""
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if needle in line:
            return seen
    stop_process(proc)
    raise AssertionError(f"no {needle!r} in:\n{seen}\n{proc.stderr.read() if proc.stderr else ''}")


def test_api_examples_run(redis_blueprint: Blueprint, network: TestNetwork) -> None:
    docs = scripts()
    assert list(docs) == ["package.py", "resume.py", "serve.py", "migrate.py"]
    names = [network.name(i) for i in range(3)]
    state_dir = str(network.state_dir)
    registry, peer = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="drafter-test-api-") as tmp:
        cwd = Path(tmp)
        package = cwd / "redis.drft"
        script = with_settings(
            docs["package.py"], BLUEPRINT_DIR=cwd / "blueprint", CACHE_DIR=CACHE,
            PACKAGE=package, NAMESPACE=names[0],
        )  # fmt: skip
        out = finish(start(script, cwd), "package.py")
        assert f"package written to {package}" in out and "256 MiB, 1 vCPU(s)" in out, out

        script = with_settings(
            docs["resume.py"], PACKAGE=package, NAMESPACE=names[0], STATE_DIR=state_dir
        )
        out = finish(start(script, cwd), "resume.py")
        assert "says b'+PONG\\r\\n'" in out and "snapshot written back" in out, out

        script = with_settings(
            docs["serve.py"], PACKAGE=package, NAMESPACE=names[1], REGISTRY=registry,
            PEER=peer, STATE_DIR=state_dir,
        )  # fmt: skip
        source = start(script, cwd)
        destination = None
        try:
            seen = wait_for_line(source, "serving the VM on")
            assert "says b'+PONG\\r\\n'" in seen and f"started from {registry}" in seen, seen
            script = with_settings(
                docs["migrate.py"], SOURCE=peer, NAMESPACE=names[2], STATE_DIR=state_dir
            )
            destination = start(script, cwd)
            seen = wait_for_line(destination, "running here")
            assert "says b'+PONG\\r\\n'" in seen and f"migrated from {peer}" in seen, seen
            assert re.search(r"^all \d+ MiB here$", seen, re.M), seen  # progress was read
            assert "the VM migrated away" in finish(source, "serve.py")
            destination.send_signal(signal.SIGINT)
            finish(destination, "migrate.py", timeout=60)
        finally:
            for proc in (source, destination):
                if proc is not None:
                    stop_process(proc)
        assert not list((cwd / "out" / "vms").glob("peer.*")), "a peer left its work files"
