"""The metrics endpoint (src/drafter/exposition.py) under hostile clients: a real
server in a child process (its threads and descriptors counted from /proc), real
sockets on loopback."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drafter import exposition, metrics
from drafter.errors import DrafterError
from support.common import assert_one_line_error, run_command
from support.net import free_port

SERVE = (
    "import sys, time\n"
    "from drafter.metrics import Metrics\n"
    "m = Metrics()\n"
    "print(m.serve('127.0.0.1:0'), flush=True)\n"
    "sys.stdin.read()\n"
)


@contextlib.contextmanager
def served() -> Iterator[tuple[subprocess.Popen[str], int]]:
    child = subprocess.Popen(
        [sys.executable, "-c", SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline().rsplit(":", 1)[1])
        yield child, port
    finally:
        child.kill()
        child.wait(10)


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def ok(answer: bytes) -> bool:
    return answer.partition(b"\r\n")[0].endswith(b" 200 OK")


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_idle_half_sent_requests_take_neither_threads_nor_descriptors(many_descriptors) -> None:
    """1000 connections that send half a request and wait: the server keeps its
    thread count and at most its cap of descriptors, and a scrape still answers."""
    with served() as (child, port):
        assert ok(scrape(port))
        before_threads, before_fds = threads(child.pid), descriptors(child.pid)
        idle = []
        try:
            for _ in range(1000):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
                idle.append(s)
            time.sleep(0.5)  # let the server accept what it will
            assert threads(child.pid) == before_threads
            assert descriptors(child.pid) <= before_fds + exposition.MAX_CONNECTIONS + 2
            answer = scrape(port)
            assert ok(answer) and b"drafter_" in answer
        finally:
            for s in idle:
                s.close()


def test_a_request_head_past_the_limit_is_dropped_unanswered() -> None:
    with served() as (_, port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (2 * exposition.MAX_HEAD))
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(100) == b""
        assert ok(scrape(port))


@pytest.mark.parametrize(
    "request_line, status",
    [(b"POST /metrics HTTP/1.1", b"405"), (b"GET /../etc/passwd HTTP/1.1", b"404")],
)
def test_only_the_metrics_are_served(request_line: bytes, status: bytes) -> None:
    with served() as (_, port), socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request_line + b"\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 " + status)


def test_metrics_beyond_loopback_need_an_explicit_flag() -> None:
    with pytest.raises(DrafterError, match="--metrics-public"):
        metrics.Metrics().serve(f"0.0.0.0:{free_port()}")
    served = metrics.Metrics()
    try:
        where = served.serve(f"0.0.0.0:{free_port()}", public=True)
        assert ok(scrape(int(where.rsplit(":", 1)[1])))
    finally:
        served.close()
    result = run_command("drafter-registry", "--metrics", f"0.0.0.0:{free_port()}")
    assert_one_line_error(result, "--metrics-public")
