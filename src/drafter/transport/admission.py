"""Who gets one of a server's connection slots when they run out: fairly, per address.

A server holds at most ``capacity`` connections. While it has room, everyone gets in.
When it is full, a newcomer is let in only by making room, in this order:

1. The connection that has waited longest in its handshake goes (any address). A
   client that knows how to talk finishes its handshake in a round trip or two, so a
   flood of connections that never say a word (or never prove a token) is cycled out
   oldest first, and a well-behaved client's handshake outlives it.
2. Else, when every slot is authenticated: the address holding the most slots gives
   up its longest-idle connection (no request or call outstanding), but only if it
   holds at least two more than the newcomer's address. So no address can keep
   another out with idle connections: the cap is shared max-min fairly.
3. Else the newcomer is refused at once (``FULL``, transient: it tries again later).

:class:`Admission` is the bookkeeping only (no sockets); :class:`ChunkServer` asks it
and closes whichever connection it names.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Slot:
    """One admitted connection: its client's address (host, no port), when it came,
    and, once its handshake proved the token, when it last did work and whether it
    has any outstanding (``busy``, read through a callback the server sets)."""

    address: str
    since: float = field(default_factory=time.monotonic)
    authenticated: bool = False
    last_work: Callable[[], float] = lambda: 0.0
    busy: Callable[[], bool] = lambda: False
    task: asyncio.Task[None] | None = None
    evicted: bool = False  # made room for another client (said so in its ERROR frame)


class Admission:
    """The slots of one server; ``admit`` decides, ``release`` frees."""

    def __init__(self, capacity: int, evict: Callable[[Slot], None]) -> None:
        self.capacity = capacity
        self._evict = evict
        self._slots: set[Slot] = set()
        self.evictions = 0
        self.refusals = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, slot: object) -> bool:
        return slot in self._slots

    def per_address(self) -> Counter[str]:
        return Counter(s.address for s in self._slots)

    def admit(self, address: str) -> Slot | None:
        """A slot for a client from ``address``, made by evicting another if the
        server is full and fairness allows it; None: refuse this client."""
        if len(self._slots) >= self.capacity:
            victim = self._victim(address)
            if victim is None:
                self.refusals += 1
                return None
            self._slots.discard(victim)
            victim.evicted = True
            self.evictions += 1
            self._evict(victim)
        slot = Slot(address)
        self._slots.add(slot)
        return slot

    def release(self, slot: Slot) -> None:
        self._slots.discard(slot)

    def _victim(self, address: str) -> Slot | None:
        waiting = [s for s in self._slots if not s.authenticated]
        if waiting:
            return min(waiting, key=lambda s: s.since)
        counts = self.per_address()
        busiest, most = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        if most < counts.get(address, 0) + 2:
            return None  # the newcomer's address holds about as many as anyone
        idle = [s for s in self._slots if s.address == busiest and not s.busy()]
        return min(idle, key=lambda s: s.last_work()) if idle else None
