"""Wire protocol version 2: frames, message bodies, limits (``docs/wire.md``).

Every message is a *frame*: a 12-byte header, a body and, on a sealed connection
(a token and no TLS), a 16-byte tag that authenticates it::

    u32 body length | u8 type | u8 flags (0) | u16 reserved (0) | u32 request id

All integers are big-endian. A body is at most :data:`MAX_BODY` bytes; a reader
refuses a larger declared length from the header alone. Nothing here trusts the
other side: every decoder checks lengths and ranges and raises :class:`ProtocolError`
(never another exception) for bytes it cannot accept.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from drafter.chunks import HASH_SIZE as HASH_SIZE
from drafter.chunks import ZERO_HASH as ZERO_HASH
from drafter.chunks import Priority as Priority
from drafter.chunks import chunk_count as chunk_count
from drafter.errors import DrafterError

Buffer = bytes | bytearray | memoryview  # a frame body as received

MAGIC = b"DRFT"
VERSION = 2
HEADER = struct.Struct(">IBBHI")
HEADER_SIZE = HEADER.size
MAX_CHUNK_SIZE = 4 << 20
MAX_BODY = MAX_CHUNK_SIZE + 64  # a chunk and its fixed fields
HANDSHAKE_MAX_BODY = 1024  # what a server reads before the client has proved the token
MAX_CLIENT_BODY = 64 << 10  # what a server reads from a client afterwards
# A control call's answer in PART frames (a switch-over's state and dirty chunks): the
# most a client assembles for one answer.
MAX_ANSWER = 64 << 20
NONCE_SIZE = 32
PROOF_SIZE = 32  # HMAC-SHA256
MAX_RESOURCES = 16
# Chunks of all resources together: a client keeps every chunk's hash (~90 bytes each
# in memory), so a welcome announcing more is refused before any hash arrives.
MAX_CHUNKS = 1 << 22  # 256 GiB at 64 KiB chunks, 1 TiB at 256 KiB
MAX_OUTSTANDING = 1024  # requests one connection may have unanswered at the server
MAX_RUN = 64  # consecutive chunks one request may ask for
MAX_ERROR_TEXT = 1024  # bytes of an ERROR frame's text that are kept (sent and received)

_HELLO = struct.Struct(">4sHH")  # magic, version, flags (+ nonce)
_WELCOME = struct.Struct(">IB")  # chunk size, resource count (+ resources, config)
_RESOURCE = struct.Struct(">BQ")  # name length, size (+ name)
_REQUEST = struct.Struct(">BBHQ")  # priority, resource, chunk count, first chunk index
_CHUNK = struct.Struct(">BBxxQI32s")  # resource, flags, index, length, BLAKE3 of the bytes
CHUNK_FIXED = _CHUNK.size  # the part of a CHUNK body a seal covers; the payload follows
_HASHES = struct.Struct(">BQ")  # resource, first chunk index (+ hashes)
_HOT = struct.Struct(">BI")  # resource, count (+ u32 chunk indices)
_ERROR = struct.Struct(">H")  # code (+ UTF-8 text)

# Hello flags.
HELLO_TOKEN = 1  # server: a token is required (client: I have a token)
HELLO_ZSTD = 2  # client: I want compressed chunks; server: I can send them
HELLO_PARTS = 4  # client: I take a control call's answer in PART frames
HELLO_LOCAL = 8  # server: the token I ask for is this host's local one (localtoken)
# CHUNK flags.
CHUNK_ZERO = 1  # no payload: the chunk is all zeros
CHUNK_ZSTD = 2  # the payload is one zstd frame of the chunk's bytes


class MsgType(IntEnum):
    """Frame types; 16-47 are control calls (answered with the same type and id)."""

    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    AUTH = 3
    WELCOME = 4
    REQUEST = 5
    CHUNK = 6
    ERROR = 8
    HASHES = 9  # S->C after WELCOME: chunk hashes of one resource, from an index on
    HOT = 10  # S->C after the hashes: chunks a resumed VM touches first
    PART = 11  # S->C: the next bytes of a control call's answer (same id); the answer ends it
    # Control calls (see docs/wire.md and docs/migration.md).
    DIRTY_LIST = 16  # -> JSON {"memory": [chunk, ...], "disk": [...]} dirtied since last
    PING = 18  # -> empty: keeps an idle connection open
    MIGRATE_OFFER = 32  # -> empty: the server accepts and starts tracking dirty chunks
    MIGRATE_SUSPENDED = 34  # switch-over -> u32 n, n bytes of JSON, then the state
    MIGRATE_DONE = 35  # JSON {"migration": id}: the client holds everything, runs the VM
    MIGRATE_RESUME = 36  # JSON {"migration": id}: the destination is back after a cut
    MIGRATE_HANDOVER = 37  # JSON {"migration": id}: may the destination run the VM now?
    MIGRATE_ABORT = 38  # JSON {"migration": id}: it never ran the VM; the source resumes it
    MIGRATE_CHALLENGE = 39  # signed: -> JSON {"chunks": {name: [chunk, ...]}} to prove


def is_control(kind: int) -> bool:
    """Whether frame type ``kind`` is a control call (16-47)."""
    return 16 <= kind <= 47


class ErrorCode(IntEnum):
    """What an ERROR frame reports; the sender closes the connection after it."""

    PROTOCOL = 1  # malformed or unexpected frame
    VERSION = 2  # unsupported protocol version
    AUTH = 3  # missing or wrong token, or a frame that failed authentication
    BAD_REQUEST = 4  # unknown resource, chunk beyond a resource's end, bad priority
    INTERNAL = 5  # the server could not read the chunk
    SHUTTING_DOWN = 6  # the server is stopping; reconnecting may work later
    TOO_MANY = 7  # too many outstanding requests on one connection
    BUSY = 9  # a migration is already in progress
    REFUSED = 10  # the server cannot do what the control call asks
    TIMEOUT = 11  # idle too long, or did not read what it asked for
    # A call names a migration the source no longer has: it took the VM back (resumed it
    # itself), or the id is wrong. The destination must not run the VM.
    NO_MIGRATION = 12
    FULL = 13  # no connection slot free for this client now (drafter.transport.admission)

    @property
    def transient(self) -> bool:
        """Whether a client should reconnect and try again after this error."""
        return self in (
            ErrorCode.INTERNAL, ErrorCode.SHUTTING_DOWN, ErrorCode.TIMEOUT, ErrorCode.FULL
        )  # fmt: skip


class ProtocolError(DrafterError):
    """The other side broke the protocol, or a call cannot be done; ``code`` goes into
    the ERROR frame we answer."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RemoteError(DrafterError):
    """The other side answered with an ERROR frame: ``code`` is its wire code (an
    :class:`ErrorCode`, or the bare number of one this version does not know), the
    message says who and what for a user. Decide on ``code``, never on the text."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def transient(self) -> bool:
        """Whether reconnecting and asking again may succeed."""
        return code_is_transient(self.code)


def code_is_transient(code: int) -> bool:
    """Whether a client should reconnect and try again after an ERROR with ``code``."""
    try:
        return ErrorCode(code).transient
    except ValueError:
        return False


def _bad(what: str) -> ProtocolError:
    return ProtocolError(ErrorCode.PROTOCOL, f"malformed {what}")


# --- framing ---------------------------------------------------------------------


def header(kind: int, length: int, request_id: int = 0, flags: int = 0) -> bytes:
    """The 12-byte header of a frame whose ``length``-byte body follows."""
    return HEADER.pack(length, kind, flags, 0, request_id)


def frame(kind: int, body: bytes = b"", request_id: int = 0) -> bytes:
    """One whole unsealed frame (the handshake, and connections without a seal)."""
    return header(kind, len(body), request_id) + body


def parse_header(head: bytes, max_body: int) -> tuple[int, int, int]:
    """``(length, type, request id)``; ProtocolError for reserved bits or a long body."""
    length, kind, flags, reserved, request_id = HEADER.unpack(head)
    if flags or reserved:
        raise ProtocolError(ErrorCode.PROTOCOL, "malformed frame header")
    if length > max_body:
        raise ProtocolError(
            ErrorCode.PROTOCOL, f"frame of {length} bytes exceeds the limit of {max_body}"
        )
    return length, kind, request_id


# --- handshake ---------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """CLIENT_HELLO and SERVER_HELLO: version, flags and a fresh nonce.

    A server hello carries nothing derived from the token: the client proves it knows
    the token first (see :mod:`drafter.transport.security`).
    """

    version: int
    flags: int
    nonce: bytes

    def body(self) -> bytes:
        return _HELLO.pack(MAGIC, self.version, self.flags) + self.nonce

    @classmethod
    def decode(cls, body: Buffer, who: str) -> Hello:
        """``who`` is "client" or "server", for the error text."""
        if len(body) < _HELLO.size or body[:4] != MAGIC:
            raise ProtocolError(ErrorCode.PROTOCOL, f"not a drafter {who} (bad magic)")
        _magic, version, flags = _HELLO.unpack_from(body)
        if version != VERSION:
            raise ProtocolError(
                ErrorCode.VERSION,
                f"protocol version {version} is not supported (this side speaks version "
                f"{VERSION}; upgrade the older side)",
            )
        if len(body) != _HELLO.size + NONCE_SIZE:
            raise _bad(f"{who} hello")
        return cls(version, flags, bytes(body[_HELLO.size :]))


@dataclass(frozen=True)
class Welcome:
    """Sent once the client's proof is accepted: server proof, chunk size, resources
    in order (name, size) and the config bytes."""

    proof: bytes
    chunk_size: int
    manifest: dict[str, int]
    config: bytes

    def body(self) -> bytes:
        parts = [self.proof, _WELCOME.pack(self.chunk_size, len(self.manifest))]
        for name, size in self.manifest.items():
            raw = name.encode()
            parts.append(_RESOURCE.pack(len(raw), size) + raw)
        parts.append(self.config)
        return b"".join(parts)

    @classmethod
    def decode(cls, body: Buffer) -> Welcome:
        try:
            proof = body[:PROOF_SIZE]
            pos = PROOF_SIZE
            chunk_size, count = _WELCOME.unpack_from(body, pos)
            pos += _WELCOME.size
            if not 0 < chunk_size <= MAX_CHUNK_SIZE or count > MAX_RESOURCES:
                raise _bad("welcome (bad chunk size or resource count)")
            manifest: dict[str, int] = {}
            for _ in range(count):
                n, size = _RESOURCE.unpack_from(body, pos)
                pos += _RESOURCE.size
                name = bytes(body[pos : pos + n]).decode("ascii")
                pos += n
                if len(name) != n or not name.isalnum() or name in manifest:
                    raise _bad("welcome (bad resource name)")
                if size > 1 << 50:
                    raise _bad("welcome (resource too large)")
                manifest[name] = size
        except (struct.error, UnicodeDecodeError):
            raise _bad("welcome") from None
        if len(proof) != PROOF_SIZE:
            raise _bad("welcome")
        if sum(chunk_count(size, chunk_size) for size in manifest.values()) > MAX_CHUNKS:
            raise _bad(f"welcome (more than {MAX_CHUNKS} chunks)")
        return cls(bytes(proof), chunk_size, manifest, bytes(body[pos:]))


@dataclass(frozen=True)
class Hashes:
    """Chunk hashes of one resource from chunk ``start`` on (ZERO_HASH: all zeros)."""

    resource: int
    start: int
    hashes: bytes  # a multiple of HASH_SIZE

    def body(self) -> bytes:
        return _HASHES.pack(self.resource, self.start) + self.hashes

    @classmethod
    def decode(cls, body: Buffer) -> Hashes:
        if len(body) < _HASHES.size or (len(body) - _HASHES.size) % HASH_SIZE:
            raise _bad("hash list")
        resource, start = _HASHES.unpack_from(body)
        return cls(resource, start, bytes(body[_HASHES.size :]))


MAX_HASHES_PER_FRAME = (MAX_BODY - _HASHES.size) // HASH_SIZE


# Chunk indices one HOT frame holds, with room for the entries of 16 resources.
MAX_HOT_CHUNKS = (MAX_BODY - 16 * _HOT.size) // 4


def fit_hot(hot: dict[int, list[int]]) -> tuple[dict[int, list[int]], bool]:
    """``hot`` cut (at its end: the chunks touched last) to what one HOT frame holds,
    and whether anything was cut."""
    room = MAX_BODY
    out: dict[int, list[int]] = {}
    for resource, indices in hot.items():
        room -= _HOT.size
        if room < 0:
            return out, True
        take = min(len(indices), room // 4)
        out[resource] = indices[:take]
        room -= 4 * take
    return out, sum(map(len, out.values())) < sum(map(len, hot.values()))


def encode_hot(hot: dict[int, list[int]]) -> bytes:
    """HOT body: for each resource, its position, a count and the chunk indices."""
    parts = []
    for resource, indices in hot.items():
        parts.append(_HOT.pack(resource, len(indices)))
        parts.append(struct.pack(f">{len(indices)}I", *indices))
    return b"".join(parts)


def decode_hot(body: Buffer, chunks: list[int]) -> dict[int, list[int]]:
    """Chunk indices per resource position; each must exist (``chunks``: counts)."""
    hot: dict[int, list[int]] = {}
    pos = 0
    try:
        while pos < len(body):
            resource, count = _HOT.unpack_from(body, pos)
            pos += _HOT.size
            if resource >= len(chunks) or resource in hot or pos + 4 * count > len(body):
                raise _bad("hot list")
            indices = list(struct.unpack_from(f">{count}I", body, pos))
            pos += 4 * count
            if any(i >= chunks[resource] for i in indices):
                raise _bad("hot list (chunk beyond the end)")
            hot[resource] = indices
    except struct.error:
        raise _bad("hot list") from None
    return hot


@dataclass(frozen=True)
class Request:
    """Ask for ``count`` consecutive chunks from ``index``; each CHUNK answer, in order,
    carries the same request id."""

    priority: int
    resource: int  # position in the welcome's resource list
    index: int
    count: int = 1

    def body(self) -> bytes:
        return _REQUEST.pack(self.priority, self.resource, self.count, self.index)

    @classmethod
    def decode(cls, body: Buffer) -> Request:
        if len(body) != _REQUEST.size:
            raise _bad("request")
        priority, resource, count, index = _REQUEST.unpack(body)
        if not 1 <= count <= MAX_RUN:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"a request for {count} chunks")
        return cls(priority, resource, index, count)


@dataclass(frozen=True)
class ChunkHead:
    """The fixed part of a CHUNK body; ``length`` is the chunk's (uncompressed) size."""

    resource: int
    flags: int
    index: int
    length: int
    hash: bytes

    def encode(self) -> bytes:
        return _CHUNK.pack(self.resource, self.flags, self.index, self.length, self.hash)

    @classmethod
    def decode(cls, body: Buffer) -> ChunkHead:
        if len(body) < CHUNK_FIXED:
            raise _bad("chunk")
        head = cls(*_CHUNK.unpack_from(body))
        if head.flags & ~(CHUNK_ZERO | CHUNK_ZSTD):
            raise _bad("chunk (unknown flags)")
        return head


def error_body(code: ErrorCode, message: str) -> bytes:
    """An ERROR body; its text is cut to MAX_ERROR_TEXT bytes."""
    return _ERROR.pack(code) + message.encode()[:MAX_ERROR_TEXT]


def decode_error(body: Buffer) -> tuple[int, str]:
    """``(code, text)`` from an ERROR body; the text is cut and shown with repr()
    quoting removed only for plain printable text, so it cannot forge log lines."""
    if len(body) < _ERROR.size:
        return int(ErrorCode.PROTOCOL), "malformed error frame"
    code = int(_ERROR.unpack_from(body)[0])
    text = bytes(body[_ERROR.size : _ERROR.size + MAX_ERROR_TEXT]).decode(errors="replace")
    return code, safe_text(text)


def safe_text(text: str) -> str:
    """Text from the other side, safe for one log line (printable, else its repr)."""
    return text if text.isprintable() else repr(text)


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return f"error {code}"


def loads_json(body: bytes, what: str, check: Callable[[Any], bool]) -> Any:
    """JSON from the other side: ProtocolError unless it parses and ``check`` holds."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise _bad(what) from None
    if not check(value):
        raise _bad(what)
    return value


def is_chunk_lists(value: Any, names: tuple[str, ...]) -> bool:
    """``{"memory": [int, ...], ...}`` with keys among ``names``."""
    return isinstance(value, dict) and all(
        k in names
        and isinstance(v, list)
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 40 for i in v)
        for k, v in value.items()
    )


# --- addresses -----------------------------------------------------------------------


def parse_addr(text: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (host "" = all interfaces)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise DrafterError(f"bad {what} {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host and not text.startswith("["):
        raise DrafterError(f"bad {what} {text!r}: write an IPv6 host as [ADDR]:PORT")
    return host, int(port_text)


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` only reaches this machine ("" = all: no)."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)
