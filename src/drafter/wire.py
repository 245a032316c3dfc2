"""The wire protocol between a serving process (registry, peer) and its clients.

Every message is a *frame*: a fixed 12-byte header followed by a body::

    u32 body length | u8 type | 3 reserved zero bytes | u32 request id

All integers are big-endian. A body is at most :data:`MAX_BODY` bytes; a reader
refuses a larger declared length before reading the body. ``docs/wire.md`` describes
the messages, the handshake and the rules in prose; this module is the code for it:
framing, the message bodies, the hello/auth proofs and the TLS/token helpers that the
server (:mod:`drafter.server`) and the client (:mod:`drafter.remote`) share.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import ssl
import struct
from dataclasses import dataclass
from enum import IntEnum
from hashlib import sha256
from pathlib import Path

from drafter.device import Priority as Priority  # re-exported: one definition, in device
from drafter.errors import DrafterError

MAGIC = b"DRFT"
VERSION = 1
HEADER = struct.Struct(">IB3xI")
HEADER_SIZE = HEADER.size
MAX_CHUNK_SIZE = 4 << 20
MAX_BODY = MAX_CHUNK_SIZE  # the largest body a reader accepts
NONCE_SIZE = 32
PROOF_SIZE = 32  # HMAC-SHA256
TOKEN_ENV = "DRAFTER_TOKEN"
MAX_OUTSTANDING = 1 << 16  # requests one connection may have queued at the server

_HELLO = struct.Struct(">4sHH")  # magic, version, flags (+ nonce, proof)
_WELCOME = struct.Struct(">II")  # chunk size, manifest length (+ manifest, config)
_REQUEST = struct.Struct(">BBxxQ")  # priority, resource, chunk index
_ZERO = struct.Struct(">I")  # chunk length
_ERROR = struct.Struct(">H")  # code (+ UTF-8 message)

FLAG_TOKEN = 1  # server hello: this server requires the shared token


class MsgType(IntEnum):
    """Frame types. 16-31 are reserved for dirty-chunk lists, 32-47 for migration."""

    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    AUTH = 3
    WELCOME = 4
    REQUEST = 5
    CHUNK = 6
    ZERO = 7
    ERROR = 8
    # Control calls (16-47): the client sends one with a request id, the server
    # answers with a frame of the same type and id (or an ERROR). See docs/wire.md.
    DIRTY_LIST = 16  # -> JSON {"memory": [chunk, ...], "disk": [...]} dirtied since last
    DIRTY_ACK = 17  # reserved
    MIGRATE_OFFER = 32  # -> empty: the server accepts and starts tracking dirty chunks
    MIGRATE_ACCEPT = 33  # reserved
    MIGRATE_SUSPENDED = 34  # switch-over -> header length, JSON (final dirty lists), state
    MIGRATE_DONE = 35  # the client holds everything and runs the VM -> empty

    @property
    def is_control(self) -> bool:
        return 16 <= self.value <= 47


def is_control(kind: int) -> bool:
    """Whether frame type ``kind`` is a control call (16-47)."""
    return 16 <= kind <= 47


class ErrorCode(IntEnum):
    """What an ERROR frame reports; the sender closes the connection after it."""

    PROTOCOL = 1  # malformed or unexpected frame
    VERSION = 2  # unsupported protocol version
    AUTH = 3  # missing or wrong token
    BAD_REQUEST = 4  # unknown resource, chunk beyond a resource's end, bad priority
    INTERNAL = 5  # the server could not read the chunk
    SHUTTING_DOWN = 6  # the server is stopping; reconnecting may work later
    TOO_MANY = 7  # too many outstanding requests on one connection
    BUSY = 9  # a migration is already in progress
    REFUSED = 10  # the server cannot do what the control call asks

    @property
    def transient(self) -> bool:
        """Whether a client should reconnect and try again after this error."""
        return self in (ErrorCode.INTERNAL, ErrorCode.SHUTTING_DOWN)


class ProtocolError(Exception):
    """The peer broke the protocol; ``code`` goes into the ERROR frame we answer with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- framing ---------------------------------------------------------------------


def frame(kind: int, body: bytes = b"", request_id: int = 0) -> bytes:
    """One whole frame as bytes (use for small bodies; chunks go as header + data)."""
    return HEADER.pack(len(body), kind, request_id) + body


def header(kind: int, length: int, request_id: int = 0) -> bytes:
    """Just the header of a frame whose ``length``-byte body is written separately."""
    return HEADER.pack(length, kind, request_id)


async def read_frame(
    reader: asyncio.StreamReader, max_body: int = MAX_BODY
) -> tuple[int, int, bytes]:
    """Read one frame: ``(type, request id, body)``.

    Raises ProtocolError for a declared length above ``max_body`` or non-zero reserved
    bytes (before reading the body), asyncio.IncompleteReadError on a cut connection.
    """
    head = await reader.readexactly(HEADER_SIZE)
    if head[5:8] != b"\0\0\0":
        raise ProtocolError(ErrorCode.PROTOCOL, "malformed frame header")
    length, kind, request_id = HEADER.unpack(head)
    if length > max_body:
        raise ProtocolError(
            ErrorCode.PROTOCOL, f"frame of {length} bytes exceeds the limit of {max_body}"
        )
    body = await reader.readexactly(length) if length else b""
    return kind, request_id, body


# --- messages --------------------------------------------------------------------


@dataclass(frozen=True)
class ClientHello:
    """First frame of a connection, client to server."""

    version: int
    nonce: bytes

    def encode(self) -> bytes:
        return frame(MsgType.CLIENT_HELLO, _HELLO.pack(MAGIC, self.version, 0) + self.nonce)

    @classmethod
    def decode(cls, body: bytes) -> ClientHello:
        if len(body) != _HELLO.size + NONCE_SIZE:
            raise ProtocolError(ErrorCode.PROTOCOL, "malformed client hello")
        magic, version, _flags = _HELLO.unpack_from(body)
        if magic != MAGIC:
            raise ProtocolError(ErrorCode.PROTOCOL, "not a drafter client (bad magic)")
        return cls(version, body[_HELLO.size :])


@dataclass(frozen=True)
class ServerHello:
    """The server's answer: its version, whether a token is needed, its nonce and proof."""

    version: int
    token_required: bool
    nonce: bytes
    proof: bytes  # PROOF_SIZE zero bytes when no token is used

    def encode(self) -> bytes:
        flags = FLAG_TOKEN if self.token_required else 0
        body = _HELLO.pack(MAGIC, self.version, flags) + self.nonce + self.proof
        return frame(MsgType.SERVER_HELLO, body)

    @classmethod
    def decode(cls, body: bytes) -> ServerHello:
        if len(body) != _HELLO.size + NONCE_SIZE + PROOF_SIZE:
            raise ProtocolError(ErrorCode.PROTOCOL, "malformed server hello")
        magic, version, flags = _HELLO.unpack_from(body)
        if magic != MAGIC:
            raise ProtocolError(ErrorCode.PROTOCOL, "not a drafter server (bad magic)")
        nonce = body[_HELLO.size : _HELLO.size + NONCE_SIZE]
        return cls(version, bool(flags & FLAG_TOKEN), nonce, body[_HELLO.size + NONCE_SIZE :])


@dataclass(frozen=True)
class Welcome:
    """Sent once the client is accepted: chunk size, resources in order, config bytes."""

    chunk_size: int
    manifest: dict[str, int]
    config: bytes

    def encode(self) -> bytes:
        listing = json.dumps([[name, size] for name, size in self.manifest.items()]).encode()
        body = _WELCOME.pack(self.chunk_size, len(listing)) + listing + self.config
        return frame(MsgType.WELCOME, body)

    @classmethod
    def decode(cls, body: bytes) -> Welcome:
        try:
            chunk_size, n = _WELCOME.unpack_from(body)
            listing = json.loads(body[_WELCOME.size : _WELCOME.size + n])
            manifest = {str(name): int(size) for name, size in listing}
        except (struct.error, ValueError, TypeError) as e:
            raise ProtocolError(ErrorCode.PROTOCOL, f"malformed welcome ({e})") from None
        if not 0 < chunk_size <= MAX_CHUNK_SIZE or any(s < 0 for s in manifest.values()):
            raise ProtocolError(ErrorCode.PROTOCOL, "malformed welcome (bad sizes)")
        return cls(chunk_size, manifest, bytes(body[_WELCOME.size + n :]))


@dataclass(frozen=True)
class Request:
    """Ask for one chunk; the answer (CHUNK or ZERO) carries the same request id."""

    priority: int
    resource: int  # position in the welcome's manifest
    index: int

    def encode(self, request_id: int) -> bytes:
        body = _REQUEST.pack(self.priority, self.resource, self.index)
        return frame(MsgType.REQUEST, body, request_id)

    @classmethod
    def decode(cls, body: bytes) -> Request:
        if len(body) != _REQUEST.size:
            raise ProtocolError(ErrorCode.PROTOCOL, "malformed request")
        return cls(*_REQUEST.unpack(body))


def zero_frame(request_id: int, length: int) -> bytes:
    """The answer for an all-zero chunk of ``length`` bytes."""
    return frame(MsgType.ZERO, _ZERO.pack(length), request_id)


def decode_zero(body: bytes) -> int:
    if len(body) != _ZERO.size:
        raise ProtocolError(ErrorCode.PROTOCOL, "malformed zero marker")
    return int(_ZERO.unpack(body)[0])


def error_frame(code: ErrorCode, message: str) -> bytes:
    """An ERROR frame; its sender closes the connection right after it."""
    return frame(MsgType.ERROR, _ERROR.pack(code) + message.encode()[:1024])


def decode_error(body: bytes) -> tuple[int, str]:
    if len(body) < _ERROR.size:
        return int(ErrorCode.PROTOCOL), "malformed error frame"
    return int(_ERROR.unpack_from(body)[0]), body[_ERROR.size :].decode(errors="replace")


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return f"error {code}"


# --- authentication --------------------------------------------------------------


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def client_proof(token: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """What a client sends to show it knows the token (the token never travels)."""
    msg = b"drafter-client\0" + server_nonce + client_nonce
    return hmac.new(token.encode(), msg, sha256).digest()


def server_proof(token: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """What a server sends to show it knows the token too."""
    msg = b"drafter-server\0" + client_nonce + server_nonce
    return hmac.new(token.encode(), msg, sha256).digest()


def proof_matches(got: bytes, want: bytes) -> bool:
    return hmac.compare_digest(got, want)


def load_token(token_file: str | os.PathLike[str] | None) -> str | None:
    """The shared token: from ``token_file`` if given, else $DRAFTER_TOKEN, else None.

    Surrounding whitespace (a trailing newline) is ignored; an empty token is an error.
    """
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise DrafterError(f"cannot read the token file {token_file}: {reason}") from None
        if not token:
            raise DrafterError(f"the token file {token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


# --- TLS -------------------------------------------------------------------------


def server_ssl_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """A server-side TLS context from PEM certificate and key files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise DrafterError(
            f"cannot load the TLS certificate: {e.filename} does not exist"
        ) from None
    except (OSError, ssl.SSLError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        raise DrafterError(
            f"cannot load the TLS certificate {cert} and key {key}: {reason}"
        ) from None
    return ctx


def client_ssl_context(ca: str | os.PathLike[str], check_hostname: bool = True) -> ssl.SSLContext:
    """A client-side TLS context trusting the CA (or self-signed certificate) in ``ca``."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
    except FileNotFoundError:
        raise DrafterError(f"the TLS CA file {ca} does not exist") from None
    except (OSError, ssl.SSLError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        raise DrafterError(f"cannot load the TLS CA file {ca}: {reason}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    return ctx


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
