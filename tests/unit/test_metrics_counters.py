"""--metrics in process: a real server and client over a few chunks on loopback, a
migration source's phases, and bad metrics addresses. End to end with VMs:
tests/vm/test_metrics.py."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from drafter import metrics
from drafter.errors import DrafterError
from drafter.hashes import chunk_hash
from drafter.migration import MigrationSource, Phase
from drafter.transport import security
from drafter.transport.client import Priority, RemoteSource
from drafter.transport.server import ChunkServer
from support.common import assert_one_line_error, run_command
from support.metrics import PHASES, Samples
from support.net import free_port

CHUNK = 4096
TOKEN = security.new_token()


class Chunks:
    """A ChunkProvider over bytes in memory: random data, a zero chunk, a short tail."""

    chunk_size = CHUNK

    def __init__(self) -> None:
        self.data = {"memory": os.urandom(3 * CHUNK) + bytes(CHUNK), "disk": b"d" * 5000}

    def manifest(self) -> dict[str, int]:
        return {name: len(data) for name, data in self.data.items()}

    def config(self) -> bytes:
        return b"{}"

    async def hashes(self, resource: str) -> list[bytes]:
        data = self.data[resource]
        return [chunk_hash(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]

    def hot(self) -> dict[str, list[int]]:
        return {}

    async def read_chunk(self, resource: str, index: int) -> tuple[bytes, bytes | None]:
        return self.data[resource][index * CHUNK : (index + 1) * CHUNK], None


def test_server_and_client_count_chunks_connections_and_auth_failures() -> None:
    served, pulled = metrics.Metrics(), metrics.Metrics()
    try:
        at_server = served.serve("127.0.0.1:0")
        at_client = pulled.serve(":0")  # the port alone: loopback
        assert at_client.startswith("127.0.0.1:")

        async def scenario() -> None:
            server = ChunkServer(Chunks())
            served.attach_server(server)
            await server.start("127.0.0.1", 0, token=TOKEN)
            raddr = f"127.0.0.1:{server.port}"
            try:
                intruder = RemoteSource(raddr, token=security.new_token(), retry_timeout=1)
                with pytest.raises(DrafterError, match="refused"):
                    await intruder.connect()
                client = RemoteSource(raddr, token=TOKEN, compress="zstd")
                pulled.attach_remote(client)
                await client.connect()
                try:
                    await client.fetch("memory", 0, Priority.DEMAND)
                    await client.fetch("memory", 1, Priority.PREFETCH)
                    await client.fetch("disk", 0, Priority.BACKGROUND)  # compresses well
                    await client.fetch("disk", 1, Priority.BACKGROUND)  # 904 bytes
                    # A chunk whose hash the client does not know: it asks, the server
                    # answers with the zero marker.
                    await client.fetch_chunk("memory", 3, Priority.BACKGROUND, None)
                    scrape = Samples(at_server)
                    assert scrape.value("drafter_server_connections") >= 1
                finally:
                    await client.close()
            finally:
                await server.close()

        asyncio.run(asyncio.wait_for(scenario(), 30))
        s = Samples(at_server)
        assert s.value("drafter_server_auth_failures_total") == 1
        assert s.value("drafter_server_connections_refused_total") == 1
        assert s.value("drafter_server_connections_accepted_total") == 1
        assert s.value("drafter_server_connections") == 0
        assert s.value("drafter_served_chunks_total", resource="memory", priority="demand") == 1
        assert s.value("drafter_served_chunks_total", resource="memory", priority="prefetch") == 1
        assert s.value("drafter_served_zero_chunks_total", resource="memory") == 1
        assert s.value("drafter_served_bytes_total", resource="memory") == 2 * CHUNK
        assert s.value("drafter_served_bytes_total", resource="disk", priority="background") == 5000
        assert 0 < s.value("drafter_served_wire_bytes_total", resource="disk") < 5000
        assert s.value("drafter_served_requests_total", priority="background") == 3

        c = Samples(at_client)
        for name in ("drafter_pulled_bytes_total", "drafter_pulled_wire_bytes_total"):
            for resource in ("memory", "disk"):
                assert c.value(name, resource=resource) == s.value(
                    name.replace("pulled", "served"), resource=resource
                ), (name, resource)
        assert c.value("drafter_pulled_chunks_total", priority="background") == 2
        assert c.value("drafter_pulled_zero_chunks_total", resource="memory") == 1
        assert c.value("drafter_chunk_fetch_seconds_count", priority="demand") == 1
        assert c.value("drafter_chunk_fetch_seconds_count", priority="prefetch") == 1
        assert c.value("drafter_chunk_fetch_seconds_count", priority="background") == 3
        assert 0 < c.value("drafter_chunk_fetch_seconds_sum") < 10
        assert c.value("drafter_client_reconnects_total") == 0
        assert c.value("process_open_fds") > 0
    finally:
        served.close()
        pulled.close()


def test_a_migration_sources_phases_and_outcomes() -> None:
    m = metrics.Metrics()
    try:
        addr = m.serve("127.0.0.1:0")
        devices: Any = {"memory": SimpleNamespace(chunk_size=CHUNK, size=CHUNK)}
        vm: Any = None  # no VM: only the phases change here
        source = MigrationSource(devices, b"{}", Path("/nonexistent"), vm)
        m.attach_source(source)
        # A destination left in pre-copy; the next one finished.
        for phase in (Phase.PRECOPY, Phase.IDLE, Phase.PRECOPY, Phase.SWITCHING):
            source._to(phase)
        for phase in (Phase.SUSPENDED, Phase.HANDED_OVER, Phase.DONE):
            source._to(phase)
        s = Samples(addr)
        source_side = {"role": "source"}
        assert s.value("drafter_migrations_total", outcome="rolled_back", **source_side) == 1
        assert s.value("drafter_migrations_total", outcome="completed", **source_side) == 1
        assert s.value(PHASES, phase="pre-copy") == 2
        assert s.value(PHASES, phase="hand-over") == 1
        assert s.value(PHASES, phase="post-copy") == 1
    finally:
        m.close()


def test_bad_metrics_addresses_are_one_line_errors() -> None:
    result = run_command("drafter-registry", "--metrics", "nowhere")
    assert_one_line_error(result, "--metrics address", "HOST:PORT")
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        result = run_command("drafter-registry", "--metrics", f"127.0.0.1:{port}")
    assert_one_line_error(result, f"cannot serve metrics on 127.0.0.1:{port}")
