"""Prometheus metrics of a registry or peer: chunks served and pulled, fetch latency,
connections, migrations (docs/metrics.md lists every metric with example queries).

One :class:`Metrics` per process, with its own registry (not prometheus_client's
global one). The transport and migration code call it through an optional hook
(a ``metrics`` attribute that is None unless ``--metrics`` was given), so a process
without metrics pays one ``is None`` test per chunk. Counters the server and client
already keep (connections, auth failures, reconnects) are read from their stats when
Prometheus scrapes, not counted twice. ``serve(addr)`` starts the exposition server
(HTTP, unauthenticated, bounded: drafter.exposition).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from drafter import exposition
from drafter.chunks import Priority
from drafter.errors import DrafterError
from drafter.transport import protocol as wire

log = logging.getLogger(__name__)

# 0.1 ms (a loopback round trip) to 10 s (a fetch waiting through a reconnect).
FETCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
DOWNTIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0)  # fmt: skip
PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                 120.0, 300.0, 600.0)  # fmt: skip

PRIORITY_NAMES = {int(p): p.name.lower() for p in Priority}  # 0 -> "demand", ...
SOURCE = "source"
DESTINATION = "destination"
COMPLETED = "completed"
ROLLED_BACK = "rolled_back"
FAILED = "failed"


# The source's phases by their names (drafter.migration.Phase values): metrics reads
# plain values and imports nothing above the wire.
_SOURCE_PHASES = {
    "pre-copy": "pre-copy",
    "switching over": "switch-over",
    "suspended": "hand-over",
    "handed over": "post-copy",
}


class ServerCounts(Protocol):
    """What a chunk server counts anyway (``ChunkServer.stats``)."""

    accepted: int
    refused: int
    auth_failures: int
    connections: int
    requests: dict[int, int]


class ClientCounts(Protocol):
    """What a client counts anyway (``RemoteSource.stats``)."""

    reconnects: int
    verify_failures: int


class Hooked(Protocol):
    """Something that calls the metrics' hooks when it has a ``metrics``."""

    metrics: Metrics | None


class Served(Hooked, Protocol):
    @property
    def stats(self) -> ServerCounts: ...


class Pulled(Hooked, Protocol):
    @property
    def stats(self) -> ClientCounts: ...


class Metrics:
    """The metrics of one registry or peer process.

    Hooks (called from the transport and migration code): :meth:`chunk_served`,
    :meth:`chunk_pulled`, :meth:`source_phase`, :meth:`migrated_in`,
    :meth:`destination_failed`. ``attach_*`` connect a server, client or migration
    source to it.
    """

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.served = _ChunkCounters("served", "sent", r)
        self.pulled = _ChunkCounters("pulled", "received", r)
        self.fetch_seconds = Histogram(
            "drafter_chunk_fetch_seconds",
            "Seconds from a chunk's request being sent to the chunk being verified",
            ["priority"], buckets=FETCH_BUCKETS, registry=r)  # fmt: skip
        self.migrations = Counter(
            "drafter_migrations_total",
            "Live migrations that ended, by this process's role and how they ended",
            ["role", "outcome"], registry=r)  # fmt: skip
        self.phase_seconds = Histogram(
            "drafter_migration_phase_seconds",
            "Seconds each migration phase took, by this process's role",
            ["role", "phase"], buckets=PHASE_BUCKETS, registry=r)  # fmt: skip
        self.downtime_seconds = Histogram(
            "drafter_migration_downtime_seconds",
            "Seconds from the VM pausing at the source to running at the destination",
            buckets=DOWNTIME_BUCKETS, registry=r)  # fmt: skip
        self.precopy_rounds = Counter(
            "drafter_migration_precopy_rounds_total",
            "Pre-copy rounds of the migrations to this process", registry=r)  # fmt: skip
        self.checkpoints = Counter(
            "drafter_checkpoints_total",
            "Checkpoints this process tried, by outcome (committed, failed)",
            ["outcome"], registry=r)  # fmt: skip
        self.checkpoint_pause_seconds = Histogram(
            "drafter_checkpoint_pause_seconds",
            "Seconds the VM was paused for a checkpoint",
            buckets=DOWNTIME_BUCKETS, registry=r)  # fmt: skip
        self.checkpoint_uploaded = Counter(
            "drafter_checkpoint_uploaded_bytes_total",
            "Bytes checkpoints uploaded (chunks, patches, manifests)", registry=r)  # fmt: skip
        self.checkpoint_generation = Gauge(
            "drafter_checkpoint_generation",
            "The latest generation this process committed", registry=r)  # fmt: skip
        self._committed_at: float | None = None
        self.checkpoint_age = Gauge(
            "drafter_checkpoint_age_seconds",
            "Seconds since the VM state of the latest committed checkpoint (what a host "
            "loss would cost now)", registry=r)  # fmt: skip
        self.checkpoint_age.set_function(self._checkpoint_age)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, resident memory, fds
        self._stats = _StatsCollector()
        r.register(self._stats)
        self._latency: dict[int, Histogram] = {}  # label children, resolved once
        self._phase_started: float | None = None  # source: when the current phase began
        self._http: exposition.Exposition | None = None

    # -- wiring ----------------------------------------------------------------------

    def attach_server(self, server: Served) -> None:
        """Count what ``server`` (a ChunkServer) sends; report its connection counters."""
        server.metrics = self
        self._stats.servers.append(server.stats)

    def attach_remote(self, remote: Pulled) -> None:
        """Count what ``remote`` (a RemoteSource) receives and how long it waits; report
        its reconnects."""
        remote.metrics = self
        self._stats.remotes.append(remote.stats)

    def attach_source(self, source: Hooked) -> None:
        """Time the phases of migrations away from this process (a MigrationSource) and
        count outcomes."""
        source.metrics = self

    # -- hooks -----------------------------------------------------------------------

    def chunk_served(self, resource: str, priority: int, logical: int, sent: int) -> None:
        """A chunk left: ``logical`` bytes as ``sent`` payload bytes (0: zero marker)."""
        self.served.count(resource, priority, logical, sent)

    def chunk_pulled(
        self, resource: str, priority: int, logical: int, received: int, seconds: float
    ) -> None:
        """A verified chunk arrived ``seconds`` after its request was sent
        (``received`` payload bytes; 0: the zero marker)."""
        self.pulled.count(resource, priority, logical, received)
        latency = self._latency.get(priority)
        if latency is None:
            latency = self._latency[priority] = self.fetch_seconds.labels(_priority(priority))
        latency.observe(seconds)

    def source_phase(self, old: str, new: str) -> None:
        """The migration source moved from phase ``old`` to ``new`` (their names, the
        values of drafter.migration.Phase; on the device loop)."""
        now = time.monotonic()
        started, self._phase_started = self._phase_started, now
        if old == new:
            return
        if started is not None and old in _SOURCE_PHASES:
            self.phase_seconds.labels(SOURCE, _SOURCE_PHASES[old]).observe(now - started)
        if new == "done":
            self.migration_ended(SOURCE, COMPLETED)
        elif new == "idle" and old != "done":
            # The destination left (or switch-over failed) before it took the VM, or
            # never came back after switch-over and the VM resumed here.
            self.migration_ended(SOURCE, ROLLED_BACK)

    def migrated_in(
        self,
        downtime_s: float,
        precopy_s: float,
        switch_s: float,
        rounds: int,
        done: asyncio.Future[bool],
    ) -> None:
        """A migration to this process resumed the VM here, after ``rounds`` pre-copy
        rounds; ``done`` ends when the source was told it is done (True), or could not
        be (False, or an error)."""
        resumed = time.monotonic()
        self.downtime_seconds.observe(downtime_s)
        self.phase_seconds.labels(DESTINATION, "pre-copy").observe(precopy_s)
        self.phase_seconds.labels(DESTINATION, "switch-over").observe(switch_s)
        self.precopy_rounds.inc(rounds)

        def finished(future: asyncio.Future[bool]) -> None:
            if future.cancelled():
                return
            ok = future.exception() is None and future.result()
            if ok:
                self.phase_seconds.labels(DESTINATION, "post-copy").observe(
                    time.monotonic() - resumed
                )
            self.migration_ended(DESTINATION, COMPLETED if ok else FAILED)

        done.add_done_callback(finished)

    def destination_failed(self) -> None:
        """A migration to this process failed before the VM resumed here."""
        self.migration_ended(DESTINATION, FAILED)

    def migration_ended(self, role: str, outcome: str) -> None:
        self.migrations.labels(role, outcome).inc()

    def checkpoint_committed(
        self, generation: int, paused_at: float, pause_s: float, uploaded: int
    ) -> None:
        """A checkpoint committed: the VM as at ``paused_at`` (wall clock) is safe."""
        self.checkpoints.labels("committed").inc()
        self.checkpoint_pause_seconds.observe(pause_s)
        self.checkpoint_uploaded.inc(uploaded)
        self.checkpoint_generation.set(generation)
        self._committed_at = paused_at

    def checkpoint_failed(self) -> None:
        self.checkpoints.labels("failed").inc()

    def _checkpoint_age(self) -> float:
        if self._committed_at is None:
            return float("nan")
        return max(0.0, time.time() - self._committed_at)

    # -- exposition ------------------------------------------------------------------

    def serve(self, addr: str, public: bool = False) -> str:
        """Serve the metrics over HTTP on ``addr`` (HOST:PORT; ``:PORT`` = loopback);
        returns HOST:PORT. They are unauthenticated: an address beyond loopback only
        when ``public`` (``--metrics-public``) says so."""
        host, port = wire.parse_addr(addr, "--metrics address")
        host = host or "127.0.0.1"
        where = wire.format_addr(host, port)
        if not wire.is_loopback(host) and not public:
            raise DrafterError(
                f"--metrics {where}: metrics are unauthenticated; serve them on loopback "
                "(:PORT) or add --metrics-public to serve them beyond it"
            )
        try:
            sock = exposition.listen(host, port)
        except (OSError, OverflowError) as e:
            text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise DrafterError(f"cannot serve metrics on {where}: {text}") from None
        self._http = exposition.Exposition(self.registry, sock)
        where = wire.format_addr(host, self._http.port)
        if not wire.is_loopback(host):
            log.warning("metrics on %s are unauthenticated: anyone who can connect reads them",
                        where)  # fmt: skip
        log.info("serving metrics on http://%s/metrics", where)
        return where

    def close(self) -> None:
        """Stop the exposition server (if any)."""
        http, self._http = self._http, None
        if http is not None:
            http.close()


def start(addr: str | None, public: bool = False) -> Metrics | None:
    """Metrics served on ``addr``, or None when it is None (``--metrics`` not given)."""
    if addr is None:
        return None
    metrics = Metrics()
    metrics.serve(addr, public)
    return metrics


def _priority(priority: int) -> str:
    return PRIORITY_NAMES.get(priority, str(priority))


class _ChunkCounters:
    """Chunks, zero markers, logical and wire bytes by resource and priority, in one
    direction ("served" or "pulled"). Label children are resolved once per pair, so a
    chunk costs three increments."""

    def __init__(self, direction: str, moved: str, registry: CollectorRegistry) -> None:
        def counter(name: str, text: str) -> Counter:
            return Counter(f"drafter_{direction}_{name}_total", text, ["resource", "priority"],
                           registry=registry)  # fmt: skip

        self.chunks = counter("chunks", f"Chunks {moved} with their data")
        self.zero_chunks = counter("zero_chunks", f"Chunks {moved} as the all-zero marker")
        self.bytes = counter("bytes", f"Logical bytes of the chunks {moved} (uncompressed)")
        self.wire_bytes = counter("wire_bytes", f"Chunk payload bytes {moved} (compressed)")
        self._children: dict[tuple[str, int], tuple[Counter, Counter, Counter, Counter]] = {}

    def count(self, resource: str, priority: int, logical: int, payload: int) -> None:
        children = self._children.get((resource, priority))
        if children is None:
            labels = (resource, _priority(priority))
            children = self._children[resource, priority] = (
                self.chunks.labels(*labels), self.zero_chunks.labels(*labels),
                self.bytes.labels(*labels), self.wire_bytes.labels(*labels),
            )  # fmt: skip
        chunks, zero_chunks, logical_bytes, wire_bytes = children
        if payload:
            chunks.inc()
            logical_bytes.inc(logical)
            wire_bytes.inc(payload)
        else:
            zero_chunks.inc()


class _StatsCollector(Collector):
    """Counters the server and client keep anyway, read when Prometheus scrapes."""

    def __init__(self) -> None:
        self.servers: list[ServerCounts] = []
        self.remotes: list[ClientCounts] = []

    def collect(self) -> Iterator[Metric]:
        servers = list(self.servers)
        remotes = list(self.remotes)
        open_now = GaugeMetricFamily(
            "drafter_server_connections", "Client connections open at this server now"
        )
        accepted = CounterMetricFamily(
            "drafter_server_connections_accepted",
            "Client connections that passed the handshake (token proof included)",
        )
        refused = CounterMetricFamily(
            "drafter_server_connections_refused",
            "Connections dropped before the handshake completed (TLS, protocol or auth)",
        )
        auth = CounterMetricFamily(
            "drafter_server_auth_failures",
            "Connections refused for a wrong or missing token (or a frame failing its seal)",
        )
        requests = CounterMetricFamily(
            "drafter_served_requests", "Chunk requests received, by priority", labels=["priority"]
        )
        by_priority: dict[str, int] = {}
        for server in servers:
            for priority, count in list(server.requests.items()):
                name = _priority(priority)
                by_priority[name] = by_priority.get(name, 0) + count
        open_now.add_metric([], sum(s.connections for s in servers))
        accepted.add_metric([], sum(s.accepted for s in servers))
        refused.add_metric([], sum(s.refused for s in servers))
        auth.add_metric([], sum(s.auth_failures for s in servers))
        for name, count in sorted(by_priority.items()):
            requests.add_metric([name], count)
        reconnects = CounterMetricFamily(
            "drafter_client_reconnects", "Times this process re-established a lost connection"
        )
        reconnects.add_metric([], sum(r.reconnects for r in remotes))
        refused_chunks = CounterMetricFamily(
            "drafter_client_verify_failures",
            "Chunks refused because they did not match their hash (the peer stops)",
        )
        refused_chunks.add_metric([], sum(r.verify_failures for r in remotes))
        yield from (open_now, accepted, refused, auth, requests, reconnects, refused_chunks)
