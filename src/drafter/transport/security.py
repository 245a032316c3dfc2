"""Who may connect, and frames nobody can change in flight: tokens, proofs, seals, TLS.

The handshake (docs/wire.md) is::

    C -> S  CLIENT_HELLO  version, flags, Nc
    S -> C  SERVER_HELLO  version, flags, Ns            (nothing derived from the token)
    C -> S  AUTH          client proof
    S -> C  WELCOME       server proof, resources, config   (only after the proof checks)

Proofs are HMAC-SHA256 keyed with the token over both hello bodies (a transcript, so
a changed flag or nonce breaks them). The server sends nothing derived from the token
before the client has proved it holds it, so a client without the token learns
nothing it could test guesses against offline. Without TLS, every frame after the
hellos is *sealed*: a 16-byte keyed BLAKE3 tag over a sequence number, the header
and the body (for a CHUNK, its fixed part, which holds the payload's hash), with one
key per direction derived from the token and both hellos.
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
import ssl
import stat
from hashlib import sha256
from pathlib import Path

import blake3

from drafter.errors import DrafterError
from drafter.transport.protocol import NONCE_SIZE, is_loopback, parse_addr

TOKEN_ENV = "DRAFTER_TOKEN"
TOKEN_PREFIX = "drft1_"
_TOKEN_BYTES = 32  # random bytes (256 bits; the format asks for no fewer than 128)
_CHECK_BYTES = 4  # then a check over them, so a typed or made-up token is told apart
TOKEN_CHARS = len(TOKEN_PREFIX) + (_TOKEN_BYTES + _CHECK_BYTES) * 4 // 3
TAG_SIZE = 16
_MAKE_ONE = "make one with `drafter-token FILE`"


def _token_check(raw: bytes) -> bytes:
    return blake3.blake3(b"drafter token v1\0" + raw).digest(length=_CHECK_BYTES)


def new_token() -> str:
    """A fresh token: ``drft1_`` and 48 URL-safe base64 characters holding 256 random
    bits and a 32-bit check over them (the only form :func:`check_token` accepts)."""
    raw = secrets.token_bytes(_TOKEN_BYTES)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw + _token_check(raw)).decode()


def check_token(token: str, origin: str) -> str:
    """``token`` if it is one :func:`new_token` makes, else DrafterError (one line).

    A token's strength cannot be measured, and one recorded plain-TCP handshake lets
    a listener test guesses offline, so only the form ``drafter-token`` writes is
    accepted: its random bits and the check over them. A password, a word or a
    string typed by hand fails the check.
    """
    body = token[len(TOKEN_PREFIX) :]
    ok = (
        token.startswith(TOKEN_PREFIX)
        and len(token) == TOKEN_CHARS
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in body)
    )
    if ok:
        decoded = base64.urlsafe_b64decode(body)
        ok = _token_check(decoded[:_TOKEN_BYTES]) == decoded[_TOKEN_BYTES:]
    if not ok:
        raise DrafterError(
            f"the token from {origin} is not one `drafter-token` makes "
            f"({TOKEN_PREFIX}... with {TOKEN_CHARS - len(TOKEN_PREFIX)} characters after it; "
            "a hand-made token can be guessed offline): "
            f"{_MAKE_ONE} and give it to every side"
        )
    return token


def load_token(token_file: str | os.PathLike[str] | None) -> str | None:
    """The shared token: from ``token_file`` if given, else $DRAFTER_TOKEN, else None.

    Surrounding whitespace (a trailing newline) is ignored; a token ``drafter-token``
    did not make (:func:`check_token`), or a file that users other than its owner may
    read or write, is an error.
    """
    if token_file:
        token = _read_private(Path(token_file))
        if not token:
            raise DrafterError(f"the token file {token_file} is empty: {_MAKE_ONE}")
        return check_token(token, f"the token file {token_file}")
    token = os.environ.get(TOKEN_ENV, "").strip()
    return check_token(token, f"${TOKEN_ENV}") if token else None


def _read_private(path: Path) -> str:
    """The text of a token file that only its owner can read or change: one that
    other users can read would hand them the VM, so it is refused, not used."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            if mode & 0o077:
                raise DrafterError(
                    f"the token file {path} can be read or changed by other users "
                    f"(mode {mode:04o}): `chmod 600 {path}`, or make a new one with "
                    "`drafter-token FILE`"
                )
            return f.read().decode().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise DrafterError(f"cannot read the token file {path}: {reason}") from None


def no_token_hint() -> str:
    return f"give --token-file (or set ${TOKEN_ENV}); {_MAKE_ONE}"


def _mac(token: str, label: bytes, *parts: bytes) -> bytes:
    h = hmac.new(token.encode(), label, sha256)
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def client_proof(token: str, client_hello: bytes, server_hello: bytes) -> bytes:
    """What a client sends to show it knows the token (the token never travels)."""
    return _mac(token, b"drafter-v2 client proof\0", client_hello, server_hello)


def server_proof(token: str, client_hello: bytes, server_hello: bytes) -> bytes:
    """What a server sends, once the client proved itself, to show it knows it too."""
    return _mac(token, b"drafter-v2 server proof\0", client_hello, server_hello)


def proof_matches(got: bytes, want: bytes) -> bool:
    return hmac.compare_digest(got, want)


class Seal:
    """Tags (or checks) the frames of one direction; a sequence number stops replays,
    drops and reordering."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._seq = 0

    def tag(self, head: bytes, covered: bytes | bytearray | memoryview) -> bytes:
        h = blake3.blake3(self._seq.to_bytes(8, "big"), key=self._key)
        h.update(head)
        h.update(covered)
        self._seq += 1
        return h.digest(length=TAG_SIZE)

    def check(self, head: bytes, covered: bytes | bytearray | memoryview, tag: bytes) -> bool:
        return hmac.compare_digest(self.tag(head, covered), tag)


def seals(token: str, client_hello: bytes, server_hello: bytes) -> tuple[Seal, Seal]:
    """``(client to server, server to client)`` seals for one connection."""
    base = _mac(token, b"drafter-v2 seal keys\0", client_hello, server_hello)
    c2s = hmac.new(base, b"client to server", sha256).digest()
    s2c = hmac.new(base, b"server to client", sha256).digest()
    return Seal(c2s), Seal(s2c)


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


def tls_server_options(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server's TLS context from ``--tls-cert``/``--tls-key``; half of them is an error."""
    if bool(cert) != bool(key):
        given, missing = ("--tls-cert", "--tls-key") if cert else ("--tls-key", "--tls-cert")
        raise DrafterError(f"{given} needs {missing} too (or give neither to serve without TLS)")
    if cert and key:
        return server_ssl_context(cert, key)
    return None


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


def new_nonce() -> bytes:
    """Fresh random bytes for a hello."""
    return secrets.token_bytes(NONCE_SIZE)


def listen_address(
    laddr: str | None, default: str, token: str | None, insecure: bool, flag: str = "--laddr"
) -> tuple[str, int]:
    """Where a server may listen, secure by default.

    Without a token, an explicit address that is not loopback is refused (unless
    ``insecure``); the default address (all interfaces) narrows to loopback.
    """
    host, port = parse_addr(laddr if laddr is not None else default, flag)
    if token or insecure or is_loopback(host):
        return host, port
    if laddr is None:
        return "127.0.0.1", port
    where = host or "all interfaces"
    raise DrafterError(
        f"refusing to serve on {where} without a token: {no_token_hint()} "
        "(or pass --insecure to serve anyone who can connect)"
    )
