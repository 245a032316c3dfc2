"""Live migration between peers: both halves of the protocol, and its wire formats.

The destination (:class:`MigrationDestination`, driven by :class:`drafter.peer.Peer`)
offers a migration, pulls every chunk while the source VM keeps running, asks for the
chunks dirtied since (pre-copy rounds), then asks the source (:class:`MigrationSource`)
to switch over: BeforeSuspend, pause, save state, sync memory, final dirty list. It
loads the state and asks for the **hand-over**, the right to run the VM: from the
grant on, the VM is the destination's and the source never resumes it by itself. The
destination resumes its VM, fetches what is left on demand and in the background
(post-copy), then says it is done and the source stops.

Until the grant the source can always take the VM back (the destination never ran
it); after it, a lost link is recovered (the destination reconnects and names the
migration), never forked. Every phase and transition is in the two transition tables
(in the source and destination modules); docs/migration.md draws them.

The package, one module per part:

- :mod:`~drafter.migration.messages`: the control calls' bodies, encoded and checked;
- :mod:`~drafter.migration.source`: :class:`MigrationSource`, its phase table and the
  record of the migration under way; :class:`VMControl`, what it needs of the VM;
- :mod:`~drafter.migration.destination`: :class:`MigrationDestination`;
- :mod:`~drafter.migration.pagecache`: the destination's page cache, kept exact.
"""

from drafter.chunks import TRACKED
from drafter.migration.destination import (
    DESTINATION_TRANSITIONS,
    DestinationPhase,
    MigrationDestination,
    no_migration,
)
from drafter.migration.messages import (
    INLINE_LIMIT,
    TAKEN_BACK,
    KeyShare,
    SwitchOver,
    check_call,
    decode_challenge,
    decode_dirty,
    decode_id,
    decode_offer,
    decode_suspended,
    encode_call,
    encode_dirty,
    encode_id,
    encode_offer,
    encode_offer_call,
    encode_suspended,
    fingerprint,
)
from drafter.migration.pagecache import CacheMirror, PageCache
from drafter.migration.source import (
    HANDLERS,
    SOURCE_TRANSITIONS,
    Migration,
    MigrationSource,
    Phase,
    VMControl,
)

__all__ = [
    "DESTINATION_TRANSITIONS",
    "HANDLERS",
    "INLINE_LIMIT",
    "SOURCE_TRANSITIONS",
    "TAKEN_BACK",
    "TRACKED",
    "CacheMirror",
    "KeyShare",
    "DestinationPhase",
    "Migration",
    "MigrationDestination",
    "MigrationSource",
    "PageCache",
    "Phase",
    "SwitchOver",
    "VMControl",
    "check_call",
    "decode_challenge",
    "decode_dirty",
    "decode_id",
    "decode_offer",
    "decode_suspended",
    "encode_dirty",
    "encode_call",
    "encode_id",
    "encode_offer",
    "encode_offer_call",
    "encode_suspended",
    "fingerprint",
    "no_migration",
]
