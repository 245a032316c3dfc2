"""The handshake of the wire protocol, both sides (docs/wire.md): hellos, the token
proofs, the seals, then the server's welcome, chunk hashes and hot chunks.

Nothing the other side says is trusted before its proof checks out; every refusal
carries its wire code (:class:`drafter.transport.protocol.RemoteError`).
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from dataclasses import dataclass

from drafter.errors import DrafterError
from drafter.transport import localtoken, security
from drafter.transport import protocol as wire
from drafter.transport.channel import Channel, FrameProtocol
from drafter.transport.protocol import (
    ErrorCode,
    MsgType,
    ProtocolError,
    RemoteError,
    code_is_transient,
)

COMPRESS_RTT = 0.002  # "auto" asks for compressed chunks from this round-trip time on


class Transient(Exception):
    """A connection problem that reconnecting may cure."""


@dataclass
class Greeting:
    """What a server says after the hellos: resources, hashes, hot chunks; the round
    trip of the hello, and whether chunks come compressed on this connection."""

    welcome: wire.Welcome
    hashes: dict[str, list[bytes]]
    hot: dict[str, list[int]]
    rtt: float
    compressed: bool


@dataclass(frozen=True)
class Dial:
    """How a client reaches and greets the server at ``raddr`` (``host``:``port``):
    its ``token`` (None: none), TLS (``ssl``, the name its certificate must carry),
    the compression it asks for ("auto", "zstd" or "none"), and how long the
    connection and the handshake may take (``timeout``)."""

    raddr: str
    host: str
    port: int
    token: str | None
    ssl: ssl_module.SSLContext | None
    server_name: str
    compress: str
    timeout: float

    async def open(self) -> tuple[Channel, Greeting]:
        """A new authenticated connection and what the server said on it; Transient
        (reconnecting may cure it) or DrafterError (fatal)."""
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(
                    FrameProtocol,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.server_name if self.ssl else None,
                ),
                self.timeout,
            )
        except ssl_module.SSLCertVerificationError as e:
            raise DrafterError(
                f"{self.raddr}: TLS certificate check failed: {e.verify_message}"
            ) from None
        except ssl_module.SSLError as e:
            raise Transient(f"TLS handshake failed: {e.reason or e}") from None
        except TimeoutError:
            raise Transient("timed out") from None
        except OSError as e:
            raise Transient(e.strerror or str(e)) from None
        assert isinstance(transport, asyncio.Transport)
        channel = Channel(transport, protocol)
        try:
            return channel, await asyncio.wait_for(self._greet(channel), self.timeout)
        except BaseException as e:
            channel.abort()
            if isinstance(e, TimeoutError):
                raise Transient("no answer to the hello") from None
            if isinstance(e, asyncio.IncompleteReadError):
                hint = "" if self.ssl else " (does it require TLS?)"
                raise Transient(
                    f"the server closed the connection during the handshake{hint}"
                ) from None
            if isinstance(e, ProtocolError):
                raise DrafterError(
                    f"{self.raddr} does not speak this protocol: {e.message}"
                ) from None
            if isinstance(e, OSError):
                raise Transient(e.strerror or str(e)) from None
            raise

    async def _greet(self, channel: Channel) -> Greeting:
        loop = asyncio.get_running_loop()
        flags = wire.HELLO_ZSTD | wire.HELLO_PARTS | (wire.HELLO_TOKEN if self.token else 0)
        client_hello = wire.Hello(wire.VERSION, flags, security.new_nonce()).body()
        sent = loop.time()
        channel.write(MsgType.CLIENT_HELLO, client_hello)
        kind, _, body = await channel.read()
        rtt = loop.time() - sent
        server_hello = bytes(body)
        self.check_refusal(kind, server_hello)
        if kind != MsgType.SERVER_HELLO:
            raise ProtocolError(ErrorCode.PROTOCOL, f"expected a server hello, got type {kind}")
        try:
            hello = wire.Hello.decode(server_hello, "server")
        except ProtocolError as e:
            if e.code == ErrorCode.VERSION:
                raise DrafterError(f"{self.raddr}: {e.message}") from None
            raise
        if self.token is not None and not hello.flags & wire.HELLO_TOKEN:
            raise DrafterError(
                f"{self.raddr} does not ask for a token, but one was given: "
                "refusing to trust a server that cannot prove it knows the token"
            )
        peername = channel.transport.get_extra_info("peername")
        same_host = bool(peername) and wire.is_loopback(str(peername[0]))
        token = self.token
        if token is None and hello.flags & wire.HELLO_TOKEN:
            # A server on this host without a token of its own asks for the host-local
            # one, which only the operator's account can read; a server with its own
            # token is never sent this one.
            local = same_host and bool(hello.flags & wire.HELLO_LOCAL)
            token = localtoken.for_dialing() if local else None
            if token is None:
                unreadable = f" (this user cannot read {localtoken.path()})" if local else ""
                raise DrafterError(
                    f"{self.raddr} requires a token{unreadable}: {security.no_token_hint()}"
                )
        # "auto": compress unless the server is on this host over a fast path (there the
        # CPU, not the link, is the limit); a long round trip means a slow path even
        # when it goes through this host (a tunnel, or the benchmark's link emulator).
        want_zstd = self.compress == "zstd" or (
            self.compress == "auto" and (not same_host or rtt >= COMPRESS_RTT)
        )
        choice_flags = wire.HELLO_ZSTD if want_zstd and hello.flags & wire.HELLO_ZSTD else 0
        choice = choice_flags.to_bytes(2, "big")
        proof = bytes(wire.PROOF_SIZE)
        if token is not None:
            proof = security.client_proof(token, client_hello, server_hello + choice)
        channel.write(MsgType.AUTH, proof + choice)
        send = recv = None
        if token is not None and self.ssl is None:
            send, recv = security.seals(token, client_hello, server_hello)
        channel.seal(send, recv)
        # A server that refuses our proof answers with an ERROR frame it cannot seal.
        channel.protocol.untagged_error = recv is not None
        try:
            kind, _, body = await channel.read()
        except ProtocolError:
            # A WELCOME sealed with another key: the server does not know our token.
            raise DrafterError(f"{self.raddr} refused the connection (wrong token?)") from None
        self.check_refusal(kind, body)  # a server with another token says so here
        if kind != MsgType.WELCOME:
            raise ProtocolError(ErrorCode.PROTOCOL, f"expected a welcome, got type {kind}")
        welcome = wire.Welcome.decode(bytes(body))
        if token is not None:
            expected = security.server_proof(token, client_hello, server_hello + choice)
            if not security.proof_matches(welcome.proof, expected):
                raise DrafterError(f"{self.raddr} failed to prove it knows the token")
        names = list(welcome.manifest)
        counts = [wire.chunk_count(s, welcome.chunk_size) for s in welcome.manifest.values()]
        hashes: dict[str, list[bytes]] = {}
        for r, name in enumerate(names):
            got: list[bytes] = []
            while len(got) < counts[r] or (counts[r] == 0 and name not in hashes):
                kind, _, body = await channel.read()
                self.check_refusal(kind, body)
                if kind != MsgType.HASHES:
                    raise ProtocolError(ErrorCode.PROTOCOL, f"expected hashes, got type {kind}")
                part = wire.Hashes.decode(bytes(body))
                n = len(part.hashes) // wire.HASH_SIZE
                if part.resource != r or part.start != len(got) or len(got) + n > counts[r]:
                    raise ProtocolError(ErrorCode.PROTOCOL, "hash list out of order")
                got.extend(part.hashes[i : i + wire.HASH_SIZE] for i in range(0, n * 32, 32))
                hashes[name] = got
            hashes[name] = got
        kind, _, body = await channel.read()
        self.check_refusal(kind, body)
        if kind != MsgType.HOT:
            raise ProtocolError(ErrorCode.PROTOCOL, f"expected the hot list, got type {kind}")
        hot = {names[r]: indices for r, indices in wire.decode_hot(bytes(body), counts).items()}
        return Greeting(welcome, hashes, hot, rtt, compressed=bool(choice_flags))

    def check_refusal(self, kind: int, body: wire.Buffer) -> None:
        """An ERROR frame where another was due: Transient or RemoteError."""
        if kind != MsgType.ERROR:
            return
        code, message = wire.decode_error(body)
        if code_is_transient(code):
            raise Transient(f"the server said: {message}")
        hint = ""
        if code == ErrorCode.AUTH:
            hint = " (set DRAFTER_TOKEN or give the right --token-file)"
        raise RemoteError(code, f"{self.raddr} refused the connection: {message}{hint}")


@dataclass(frozen=True)
class Accepted:
    """What a client chose in its hellos (server side)."""

    compress: bool  # it wants compressed chunks, and the server can send them
    parts: bool  # it takes a control call's answer in PART frames
    proof: bytes  # the server's proof for the welcome (zeros without a token)


async def accept(channel: Channel, token: str | None, tls: bool, local: bool = False) -> Accepted:
    """The server's side of the hellos and proofs on ``channel``: ProtocolError (with
    the code the ERROR frame carries) for a client that breaks the protocol or does
    not prove it holds ``token``. Seals the channel where the token asks for it.
    ``local``: ``token`` is the host-local one, and the hello says so."""
    kind, _, body = await channel.read()
    client_hello = bytes(body)
    if kind != MsgType.CLIENT_HELLO:
        raise ProtocolError(ErrorCode.PROTOCOL, f"expected a client hello, got frame type {kind}")
    hello = wire.Hello.decode(client_hello, "client")
    flags = wire.HELLO_ZSTD | (wire.HELLO_TOKEN if token else 0)
    if token and local:
        flags |= wire.HELLO_LOCAL
    server_hello = wire.Hello(wire.VERSION, flags, security.new_nonce()).body()
    channel.write(MsgType.SERVER_HELLO, server_hello)
    kind, _, body = await channel.read()
    auth = bytes(body)
    if kind != MsgType.AUTH:
        raise ProtocolError(ErrorCode.PROTOCOL, f"expected auth, got frame type {kind}")
    proof, choice = auth[: wire.PROOF_SIZE], auth[wire.PROOF_SIZE :]
    if len(choice) != 2:
        raise ProtocolError(ErrorCode.PROTOCOL, "malformed auth")
    server_proof = bytes(wire.PROOF_SIZE)
    send = recv = None
    if token:
        want = security.client_proof(token, client_hello, server_hello + choice)
        if not security.proof_matches(proof, want):
            raise ProtocolError(ErrorCode.AUTH, "wrong or missing token")
        server_proof = security.server_proof(token, client_hello, server_hello + choice)
        if not tls:
            recv, send = security.seals(token, client_hello, server_hello)
    compress = bool(int.from_bytes(choice, "big") & wire.HELLO_ZSTD & hello.flags)
    channel.seal(send, recv)
    # What a client sends is small (requests, control calls): a header cannot make the
    # server set aside a chunk-sized buffer.
    channel.protocol.max_body = wire.MAX_CLIENT_BODY
    return Accepted(compress, bool(hello.flags & wire.HELLO_PARTS), server_proof)
