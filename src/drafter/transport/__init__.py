"""Moving a VM's resources between hosts: the wire protocol (v2), its server and client.

- :mod:`~drafter.transport.protocol`: frames, messages and limits (docs/wire.md);
- :mod:`~drafter.transport.security`: tokens, proofs, frame seals, TLS;
- :mod:`~drafter.transport.channel`: one connection's frames in and out;
- :mod:`~drafter.transport.server`: :class:`ChunkServer`, serving any ChunkProvider;
- :mod:`~drafter.transport.client`: :class:`RemoteSource`, fetching verified chunks;
- :mod:`~drafter.transport.registry`: :class:`PackageProvider`, a package served read-only.
"""

from drafter.transport.client import RemoteSource, VerificationError
from drafter.transport.protocol import Priority
from drafter.transport.registry import PackageProvider
from drafter.transport.server import ChunkProvider, ChunkServer, ServerLimits

__all__ = [
    "ChunkProvider",
    "ChunkServer",
    "PackageProvider",
    "Priority",
    "RemoteSource",
    "ServerLimits",
    "VerificationError",
]
