"""The migration's messages: the bodies of its control calls, encoded and checked.

Everything decoded here comes from the other side and is hostile until checked:
every decoder raises :class:`drafter.transport.protocol.ProtocolError` (never another
exception) for a body it cannot accept. docs/migration.md describes each call.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from drafter.chunks import TRACKED
from drafter.transport.protocol import ErrorCode, ProtocolError, is_chunk_lists, loads_json

_SUSPENDED_HEAD = struct.Struct(">I")  # length of the JSON part; the state follows
# The text of the refusal (ErrorCode.NO_MIGRATION) a call naming a migration the
# source no longer has gets.
TAKEN_BACK = "no such switched-over migration"
MAX_PHASES = 16  # timed steps a switch-over answer may name
INLINE_MARGIN = 64 << 10  # room left in the switch-over answer for its head
# The most a switch-over answer carries with the state (the dirty pages; the rest is
# fetched after the resume): a few seconds at tens of Mbit/s, in the downtime.
INLINE_LIMIT = 16 << 20
MAX_HEAD = 4 << 20  # a switch-over answer's JSON head (dirty lists, runs)
MAX_RUNS = 1 << 16  # inline runs in one switch-over answer


@dataclass
class SwitchOver:
    """The source's answer to a switch-over: the chunks dirtied since the last round,
    when the VM paused (wall clock), the milliseconds each step took there, the state,
    and the bytes of some of the dirty chunks (``inline``: resource -> index -> bytes),
    so that the destination need not ask for them once its VM runs."""

    dirty: dict[str, list[int]]
    paused_at: float
    phases: dict[str, float]
    state: bytes
    inline: dict[str, dict[int, list[tuple[int, bytes]]]] = field(default_factory=dict)


def encode_suspended(answer: SwitchOver) -> bytes:
    """The switch-over answer on the wire: u32 length, JSON head, the state, then the
    inline chunks' bytes in the order the head lists them."""
    head = json.dumps(
        {
            "dirty": answer.dirty,
            "paused_at": answer.paused_at,
            "phases": answer.phases,
            "state_size": len(answer.state),
            "inline": {
                name: [
                    [index, offset, len(data)]
                    for index, runs in chunks.items()
                    for offset, data in runs
                ]
                for name, chunks in answer.inline.items()
            },  # fmt: skip
        }
    ).encode()
    runs = [data for chunks in answer.inline.values() for r in chunks.values() for _, data in r]
    return b"".join([_SUSPENDED_HEAD.pack(len(head)), head, answer.state, *runs])


def _is_phases(value: object) -> bool:
    return (
        isinstance(value, dict)
        and len(value) <= MAX_PHASES
        and all(
            isinstance(k, str)
            and len(k) <= 32
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and 0 <= v < 1e7
            for k, v in value.items()
        )
    )


def _is_runs(value: object) -> bool:
    """``{"memory": [[index, offset, length], ...], ...}``: the inline runs' shape, at
    most MAX_RUNS of them."""
    if not isinstance(value, dict) or not all(isinstance(v, list) for v in value.values()):
        return False
    if sum(len(v) for v in value.values()) > MAX_RUNS:
        return False
    return all(
        k in TRACKED
        and isinstance(v, list)
        and all(
            isinstance(r, list)
            and len(r) == 3
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 40 for i in r)
            for r in v
        )
        for k, v in value.items()
    )


def decode_suspended(body: bytes, sizes: dict[str, tuple[int, int]] | None = None) -> SwitchOver:
    """The switch-over answer from a source; ProtocolError if it is malformed.
    ``sizes`` (resource -> (size, chunk size)) says how long each inline chunk is."""
    if len(body) < _SUSPENDED_HEAD.size:
        raise ProtocolError(ErrorCode.PROTOCOL, "malformed switch-over answer")
    (length,) = _SUSPENDED_HEAD.unpack_from(body)
    if length > MAX_HEAD:
        raise ProtocolError(ErrorCode.PROTOCOL, "a switch-over answer's head beyond 4 MiB")
    end = 4 + length
    head = loads_json(
        body[4:end],
        "switch-over answer",
        lambda v: (
            isinstance(v, dict)
            and is_chunk_lists(v.get("dirty"), TRACKED)
            and isinstance(v.get("paused_at", 0.0), (int, float))
            and _is_phases(v.get("phases", {}))
            and _is_runs(v.get("inline", {}))
            and isinstance(v.get("state_size", len(body) - end), int)
            and 0 <= v.get("state_size", len(body) - end) <= len(body) - end
        ),
    )
    phases = {k: float(v) for k, v in head.get("phases", {}).items()}
    state_end = end + head.get("state_size", len(body) - end)
    inline: dict[str, dict[int, list[tuple[int, bytes]]]] = {}
    at = state_end
    for name, runs in head.get("inline", {}).items():
        size, chunk_size = (sizes or {}).get(name, (0, 1))
        dirty = set(head["dirty"].get(name, []))
        chunks: dict[int, list[tuple[int, bytes]]] = {}
        inline[name] = chunks
        last = (-1, 0)  # (index, end) of the run before: runs come in order, apart
        for index, offset, length in runs:
            if index not in dirty:
                raise ProtocolError(ErrorCode.PROTOCOL, "inline bytes of a chunk not dirty")
            if (index, offset) < last:
                raise ProtocolError(ErrorCode.PROTOCOL, "inline runs out of order")
            run_end = offset + length
            if length <= 0 or run_end > min(chunk_size, size - index * chunk_size):
                raise ProtocolError(ErrorCode.PROTOCOL, f"inline run {name} {index} is cut")
            if at + length > len(body):
                raise ProtocolError(ErrorCode.PROTOCOL, f"inline run {name} {index} is cut")
            chunks.setdefault(index, []).append((offset, body[at : at + length]))
            at += length
            last = (index, run_end)
    if at != len(body):
        raise ProtocolError(ErrorCode.PROTOCOL, "bytes after the switch-over answer's chunks")
    state = body[end:state_end]
    return SwitchOver(head["dirty"], float(head.get("paused_at", 0.0)), phases, state, inline)


def decode_offer(body: bytes) -> tuple[str, dict[str, list[int]]]:
    """The answer to an offer: the migration's id and what changed since hashing."""
    value = loads_json(
        body,
        "offer answer",
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("migration"), str)
            and 0 < len(v["migration"]) <= 64
            and is_chunk_lists(v.get("dirty"), TRACKED)
        ),
    )
    return value["migration"], value["dirty"]


def encode_id(migration: str) -> bytes:
    """The body of the calls that name a migration (all after the offer but DIRTY_LIST)."""
    return json.dumps({"migration": migration}).encode()


def encode_handover(migration: str, lease_holder: str | None) -> bytes:
    """The hand-over call: the migration, and the name under which the destination
    takes the VM's checkpoint lease (None: it does not checkpoint the VM)."""
    doc: dict[str, str] = {"migration": migration}
    if lease_holder is not None:
        doc["lease_holder"] = lease_holder
    return json.dumps(doc).encode()


def decode_lease_holder(body: bytes) -> str | None:
    """The lease holder a hand-over call names, or None (a short printable name only)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    holder = value.get("lease_holder") if isinstance(value, dict) else None
    if isinstance(holder, str) and 0 < len(holder) <= 256 and holder.isprintable():
        return holder
    return None


def decode_id(body: bytes) -> str | None:
    """The migration a call names, or None if the body does not name one."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict) and isinstance(value.get("migration"), str):
        return str(value["migration"])
    return None


def decode_dirty(body: bytes) -> dict[str, list[int]]:
    """A dirty-list answer from a source; ProtocolError if it is malformed."""
    value: dict[str, list[int]] = loads_json(
        body, "dirty list", lambda v: is_chunk_lists(v, TRACKED)
    )
    return value


def encode_offer(migration: str, dirty: dict[str, list[int]]) -> bytes:
    """The answer to an offer: the migration's id and what changed since hashing."""
    return json.dumps({"migration": migration, "dirty": dirty}).encode()


def encode_dirty(dirty: dict[str, list[int]]) -> bytes:
    """A dirty-list answer: resource -> the chunks written since the last one."""
    return json.dumps(dirty).encode()
