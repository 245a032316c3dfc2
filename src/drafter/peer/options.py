"""How a peer starts: where the VM comes from, where it runs, how it pulls and serves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from drafter.network.state import DEFAULT_STATE_DIR

if TYPE_CHECKING:
    from drafter.metrics import Metrics


@dataclass
class PeerOptions:
    """How a :class:`Peer` starts: where the VM comes from (``raddr``: a registry, or a
    peer to migrate it from), the namespace it runs in, and how it pulls and serves."""

    raddr: str  # the server of every resource not named in raddrs
    netns: str | None
    token: str | None = None
    # Served with when there is no token (the host-local one; None: serve anyone).
    local_token: str | None = None
    tls_ca: str | None = None
    # Most background requests (runs of up to PULL_RUN chunks) at once; the client's
    # window bounds the bytes in flight.
    pull_workers: int = 512
    compress: str = "auto"  # zstd unless the server is this host's loopback ("auto")
    # A package on this host: chunks whose hash matches are taken from it, not moved.
    local_package: Path | None = None
    # Seconds after the resume during which the chunks the VM reads are recorded as
    # its hot set (sent first to the next host).
    hot_window: float = 3.0
    # Resources that come from a server of their own (resource -> HOST:PORT).
    raddrs: dict[str, str] = field(default_factory=dict)
    # Fraction of the VM's bytes that may still be missing when the VM resumes:
    # 1 resumes at once (everything lazily), 0 waits until everything is local.
    resume_threshold: float = 1.0
    resume_timeout: float = 60.0
    retry_timeout: float = 30.0
    accel: str = "auto"
    work_root: Path = Path("out/vms")
    # Serve this VM here once it runs, so the next peer can migrate it ("" = don't).
    laddr: str = ""
    tls_cert: str | None = None
    tls_key: str | None = None
    # Pre-copy (migration from a peer): at most this many rounds of re-pulling dirtied
    # chunks; they end early once a round's dirty chunks total at most precopy_bytes.
    precopy_rounds: int = 5
    precopy_bytes: int = 8 << 20
    # After switch-over and before the hand-over, how long a source waits for a lost
    # destination to come back before it resumes the VM itself (None: never by itself;
    # after the hand-over only its operator can, with SIGUSR1).
    grace: float | None = 30.0
    # How long a destination asks for the hand-over (through reconnects) before it
    # gives the migration up and the source resumes the VM.
    handover_timeout: float = 15.0
    # A destination silent this long during pre-copy loses the migration (source side).
    offer_timeout: float = 30.0
    # A pre-copy not switched over this long after its offer ends (source side).
    precopy_timeout: float = 600.0
    metrics: Metrics | None = None  # Prometheus metrics (drafter.metrics), if served
    # The daemon's state directory (the namespace's info, the handover records).
    state_dir: str = DEFAULT_STATE_DIR
    # A host address that follows this VM from namespace to namespace (docs/networking.md).
    stable_address: str | None = None
    # A package in object storage (an s3:// or http(s):// raddr): the BLAKE3 digest its
    # index must have (--index-digest), and S3 virtual-hosted addressing.
    index_pin: bytes | None = None
    s3_virtual_hosted: bool = False
    # The host's chunk cache (--chunk-cache): chunks another VM on this host already
    # pulled, from any source, are taken from it, and every pulled one is kept.
    chunk_cache: Path | None = None
    # Continuous checkpoints to s3://BUCKET/PREFIX (docs/checkpoints.md); a raddr that
    # names such a prefix resumes its latest generation and checkpoints there on.
    checkpoint: str | None = None
    checkpoint_interval: float = 30.0
    checkpoint_keep: int = 3
    lease_time: float = 15.0  # the VM's lease: renewed every quarter of it
