"""The migration's messages: the bodies of its control calls, encoded and checked.

Everything decoded here comes from the other side and is hostile until checked:
every decoder raises :class:`drafter.transport.protocol.ProtocolError` (never another
exception) for a body it cannot accept. docs/migration.md describes each call.
"""

from __future__ import annotations

import hmac
import json
import secrets
import struct
from dataclasses import dataclass, field

import blake3

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

# The migration key: an ephemeral Diffie-Hellman exchange in the offer and its answer
# (RFC 3526's 2048-bit MODP group 14, a safe prime; generator 2), so that only the two
# ends know it, even on a link that is sealed but not encrypted (no TLS).
_DH_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
    "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
    "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
    "F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6"
    "955817183995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)
_DH_BYTES = 256
MAX_SEEN = 1 << 16  # call numbers a source remembers (replays refused)


class KeyShare:
    """One side's half of the migration key: a random exponent and its public value."""

    def __init__(self) -> None:
        self._secret = secrets.randbits(256) | 1 << 255
        self.public = pow(2, self._secret, _DH_P).to_bytes(_DH_BYTES, "big").hex()

    def key(self, theirs: object, migration: str) -> bytes:
        """The migration key from the other side's public value; ProtocolError if it is
        not one (a value outside 2..p-2 would make the key guessable)."""
        if not isinstance(theirs, str) or len(theirs) != 2 * _DH_BYTES:
            raise ProtocolError(ErrorCode.PROTOCOL, "malformed migration key share")
        try:
            y = int(theirs, 16)
        except ValueError:
            raise ProtocolError(ErrorCode.PROTOCOL, "malformed migration key share") from None
        if not 2 <= y <= _DH_P - 2:
            raise ProtocolError(ErrorCode.PROTOCOL, "a weak migration key share")
        shared = pow(y, self._secret, _DH_P).to_bytes(_DH_BYTES, "big")
        return blake3.blake3(
            shared + migration.encode(), derive_key_context="drafter migration key v1"
        ).digest()


def fingerprint(migration: str) -> str:
    """What logs say of a migration: a short hash of its id, never the id."""
    return blake3.blake3(migration.encode()).hexdigest(length=4)


def _proof(key: bytes, kind: int, doc: dict[str, object]) -> str:
    signed = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return blake3.blake3(b"%d\0" % kind + signed, key=key).hexdigest(length=16)


def encode_call(key: bytes, kind: int, migration: str, seq: int, **fields: object) -> bytes:
    """A call naming the migration: its id, a call number never used before, the
    other fields, and a proof over all of them and the call's kind with the migration
    key (only the destination that offered holds it)."""
    doc: dict[str, object] = {"migration": migration, "seq": seq, **fields}
    return json.dumps({**doc, "proof": _proof(key, kind, doc)}).encode()


def check_call(key: bytes, kind: int, migration: str, seen: set[int], body: bytes) -> dict:  # type: ignore[type-arg]
    """The fields of a call naming ``migration`` with a proof made with ``key`` and a
    call number not in ``seen`` (then added); ProtocolError NO_MIGRATION otherwise, as
    for any call that does not name the migration (a caller learns nothing more)."""
    refused = ProtocolError(ErrorCode.NO_MIGRATION, TAKEN_BACK)
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise refused from None
    if not isinstance(doc, dict) or not isinstance(doc.get("proof"), str):
        raise refused
    proof = doc.pop("proof")
    seq = doc.get("seq")
    if (
        doc.get("migration") != migration
        or not isinstance(seq, int)
        or isinstance(seq, bool)
        or seq in seen
        or len(seen) >= MAX_SEEN
        or not hmac.compare_digest(proof.encode(), _proof(key, kind, doc).encode())
    ):
        raise refused
    seen.add(seq)
    return doc


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


def encode_offer_call(share: KeyShare) -> bytes:
    """The offer: the destination's half of the migration key."""
    return json.dumps({"key_share": share.public}).encode()


def decode_offer_call(body: bytes) -> object:
    """The destination's key share an offer carries (checked by :meth:`KeyShare.key`)."""
    value = loads_json(body, "offer", lambda v: isinstance(v, dict))
    return value.get("key_share")


def decode_offer(body: bytes) -> tuple[str, dict[str, list[int]], object]:
    """The answer to an offer: the migration's id, what changed since hashing, and the
    source's half of the migration key."""
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
    return value["migration"], value["dirty"], value.get("key_share")


def encode_id(migration: str) -> bytes:
    """A body that names a migration without proving its key (refused by a source:
    what a third party that learnt the id could send)."""
    return json.dumps({"migration": migration}).encode()


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


PROOF_CHUNKS = 32  # chunks challenged per resource: a few, at random, among the non-zero


def encode_grant(nonce: bytes) -> bytes:
    """The hand-over's answer: the nonce of the proof of possession to come."""
    return json.dumps({"nonce": nonce.hex()}).encode()


def decode_grant(body: bytes) -> bytes:
    """The nonce a hand-over's answer carries; ProtocolError if it is malformed."""
    value = loads_json(
        body,
        "hand-over answer",
        lambda v: isinstance(v, dict) and isinstance(v.get("nonce"), str) and len(v["nonce"]) == 64,
    )
    try:
        return bytes.fromhex(value["nonce"])
    except ValueError:
        raise ProtocolError(ErrorCode.PROTOCOL, "malformed hand-over answer") from None


def encode_challenge(chunks: dict[str, list[int]]) -> bytes:
    return json.dumps({"chunks": chunks}).encode()


def decode_challenge(body: bytes, counts: dict[str, int]) -> dict[str, list[int]]:
    """The chunks a source challenges (resource -> indices, at most PROOF_CHUNKS each,
    within ``counts``); ProtocolError if malformed."""
    value = loads_json(body, "challenge", lambda v: isinstance(v, dict))
    chunks = value.get("chunks")
    if not isinstance(chunks, dict) or not all(
        name in counts
        and isinstance(indices, list)
        and len(indices) <= PROOF_CHUNKS
        and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < counts[name]
            for i in indices
        )
        for name, indices in chunks.items()
    ):
        raise ProtocolError(ErrorCode.PROTOCOL, "malformed challenge")
    return chunks


def decode_answers(doc: dict, challenge: dict[str, list[int]]) -> dict[str, list[bytes]] | None:  # type: ignore[type-arg]
    """The tags a DONE call answers a challenge with, one per challenged chunk, in its
    order; None if they do not fit the challenge."""
    answers = doc.get("answers")
    if not isinstance(answers, dict) or set(answers) != set(challenge):
        return None
    out: dict[str, list[bytes]] = {}
    for name, indices in challenge.items():
        tags = answers[name]
        if not isinstance(tags, list) or len(tags) != len(indices):
            return None
        try:
            out[name] = [bytes.fromhex(t) for t in tags if isinstance(t, str)]
        except ValueError:
            return None
        if len(out[name]) != len(indices):
            return None
    return out


def decode_dirty(body: bytes) -> dict[str, list[int]]:
    """A dirty-list answer from a source; ProtocolError if it is malformed."""
    value: dict[str, list[int]] = loads_json(
        body, "dirty list", lambda v: is_chunk_lists(v, TRACKED)
    )
    return value


def encode_offer(migration: str, dirty: dict[str, list[int]], share: KeyShare) -> bytes:
    """The answer to an offer: the migration's id, what changed since hashing, and the
    source's half of the migration key."""
    return json.dumps({"migration": migration, "dirty": dirty, "key_share": share.public}).encode()


def encode_dirty(dirty: dict[str, list[int]]) -> bytes:
    """A dirty-list answer: resource -> the chunks written since the last one."""
    return json.dumps(dirty).encode()
