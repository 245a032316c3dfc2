"""A peer: start a VM from a remote package (registry) without downloading it first,
or migrate it here from another peer; then serve it on for the next migration.

The peer learns the resources from the remote, fetches the small ``state`` whole,
then resumes the VM at once: ``memory``, ``disk``, ``kernel`` and ``initramfs`` are
devices whose chunks come on demand (the VM waits on a page fault or disk read)
while background workers pull the rest. Every write stays in the peer's own
copy-on-write cache; nothing goes back to the remote.

One module per role: :mod:`.options`, :mod:`.sources` (the remotes and the lazy
devices), :mod:`.pull` (the pull workers), :mod:`.incoming` (a migration to here),
:mod:`.serving` (serving the VM on), :mod:`.summary`, and :mod:`.peer`, the
orchestrator.
"""

from drafter.peer.options import PeerOptions
from drafter.peer.peer import PEER_TRANSITIONS, Peer, PeerPhase
from drafter.peer.pull import PullPool
from drafter.peer.summary import MigrationSummary, PullProgress

__all__ = [
    "PEER_TRANSITIONS",
    "MigrationSummary",
    "Peer",
    "PeerOptions",
    "PeerPhase",
    "PullPool",
    "PullProgress",
]
