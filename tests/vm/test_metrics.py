"""--metrics: Prometheus metrics of registries and peers move during pulls and migrations.

In process, without VMs: tests/unit/test_metrics_counters.py."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time

from support.metrics import PHASES, Samples
from support.net import free_port
from support.vms import finish_source, migrate, registry, wait_resumed


class Scraper(threading.Thread):
    """Scrapes ``addr`` every 20 ms while the process serves it; keeps the last scrape."""

    def __init__(self, addr: str) -> None:
        super().__init__(daemon=True)
        self.addr = addr
        self.last: Samples | None = None
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self.last = Samples(self.addr)
            time.sleep(0.02)


def until(check, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- end to end: a registry, a peer pulling from it, a second peer migrating it ------


def read_until(proc: subprocess.Popen, prefix: str) -> str:
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, ""):
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting with {prefix!r}")


def test_registry_and_peers_serve_metrics_that_move(seeded_package, network, workdir) -> None:
    at_registry, at_first, at_second = (f"127.0.0.1:{free_port()}" for _ in range(3))
    with (
        registry(seeded_package, "--metrics", at_registry) as (_, raddr),
        contextlib.ExitStack() as stack,
    ):
        port = free_port()
        first = stack.enter_context(
            migrate(raddr, network.name(0), workdir, f"127.0.0.1:{port}", "--metrics", at_first)
        )
        wait_resumed(first)
        # Resumed: the state came at demand priority, the pull goes on in the background.
        early = Samples(at_first)
        state = early.value("drafter_pulled_bytes_total", resource="state")
        assert state > 0
        assert early.value("drafter_chunk_fetch_seconds_count", priority="demand") > 0
        read_until(first, "started from")  # every chunk is local
        pulled = Samples(at_first)
        assert pulled.value("drafter_pulled_bytes_total", priority="background") > 0
        assert pulled.value("drafter_pulled_bytes_total") >= early.value(
            "drafter_pulled_bytes_total"
        )
        served = Samples(at_registry)
        assert served.value("drafter_served_bytes_total", resource="state") == state
        assert served.value("drafter_served_bytes_total") >= pulled.value(
            "drafter_pulled_bytes_total"
        )
        assert served.value("drafter_server_connections_accepted_total") == 1
        # With every chunk local, the peer lets the registry go.
        deadline = time.monotonic() + 10
        while Samples(at_registry).value("drafter_server_connections") != 0:
            assert time.monotonic() < deadline, "the peer still holds its registry connection"
            time.sleep(0.05)

        source = Scraper(at_first)  # the source exits once the VM migrated away
        second = stack.enter_context(
            migrate(f"127.0.0.1:{port}", network.name(1), workdir, "", "--metrics", at_second)
        )
        wait_resumed(second)
        resumed = Samples(at_second)
        assert resumed.value("drafter_migration_downtime_seconds_count") == 1
        assert 0 < resumed.value("drafter_migration_downtime_seconds_sum") < 30
        for phase in ("pre-copy", "switch-over"):
            assert resumed.value(PHASES, phase=phase, role="destination") == 1, phase
        assert resumed.value("drafter_pulled_bytes_total", resource="memory") > 0
        finish_source(first)
        source.stop.set()
        source.join(5)
        last = source.last  # just before the source stopped
        assert last is not None
        assert last.value("drafter_served_bytes_total", resource="memory") > 0
        assert last.value(PHASES, role="source", phase="pre-copy") == 1

        def completed() -> bool:
            done = Samples(at_second)
            return done.value("drafter_migrations_total", outcome="completed") == 1

        until(completed, "the destination to count a completed migration")
        done = Samples(at_second)
        assert done.value("drafter_migrations_total", outcome="failed") == 0
        assert done.value(PHASES, phase="post-copy", role="destination") == 1
        second.send_signal(signal.SIGINT)
        second.communicate(timeout=60)
        assert second.returncode == 0
