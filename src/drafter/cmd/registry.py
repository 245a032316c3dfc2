"""drafter-registry: serve a package's resources over the network, read-only.

The package is a file, or an object (``s3://BUCKET/KEY``, ``http(s)://HOST/PATH``) read
lazily through its index (:mod:`drafter.objects.provider`)."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import ssl
import time
from pathlib import Path

from drafter import cli, metrics
from drafter.cmd import storeflags
from drafter.errors import DrafterError
from drafter.index import index_key
from drafter.objects import ObjectSource, StoreOptions, is_object_url, parse_location
from drafter.objects.provider import ObjectProvider
from drafter.package import open_package
from drafter.transport import localtoken, security
from drafter.transport import protocol as wire
from drafter.transport.registry import DEFAULT_CHUNK_SIZE, PackageProvider
from drafter.transport.server import ChunkProvider, ChunkServer

PROG = "drafter-registry"
DEFAULT_LADDR = ":1337"
# The seed's per-resource addresses (drafter-peer --state-raddr localhost:1600 ...).
RESOURCE_LADDRS = {"state": 1600, "memory": 1601, "initramfs": 1602, "kernel": 1603, "disk": 1604}
log = logging.getLogger(__name__)


async def _open_object(
    url: str, token: str | None, pin: bytes | None, store: StoreOptions, chunk_size: int | None
) -> ObjectProvider:
    """A package in object storage, its index read and checked; a store outage later
    stalls the clients' requests rather than failing them."""
    # With --index-digest the pin is the check; else a token must have signed it.
    key = index_key(token) if token and pin is None else None
    source = ObjectSource(url, key=key, pin=pin, options=store)
    try:
        await source.connect()
        if chunk_size is not None and chunk_size != source.chunk_size:
            raise DrafterError(
                f"{url} has chunks of {source.chunk_size} bytes (its index): drop "
                f"--chunk-size {chunk_size} or give that size"
            )
    except BaseException:
        await source.close()
        raise
    source.keep_trying = True
    return ObjectProvider(source)


async def _serve(
    package_path: str,
    addresses: list[tuple[str, int]],
    token: str | None,
    tls: ssl.SSLContext | None,
    chunk_size: int | None,
    served: metrics.Metrics | None = None,
    store: StoreOptions | None = None,
    pin: bytes | None = None,
    local_token: str | None = None,
) -> None:
    """Serve ``package_path`` on ``addresses`` to clients that prove ``token`` (or, when
    there is none, ``local_token``: the host-local one; neither: anyone)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    provider: ChunkProvider
    if is_object_url(package_path):
        provider = await _open_object(package_path, token, pin, store or StoreOptions(), chunk_size)
        log.info("serving %s lazily through its index", package_path)
    else:
        package = PackageProvider(
            open_package(Path(package_path)), chunk_size or DEFAULT_CHUNK_SIZE
        )
        provider = package
        started = time.monotonic()
        try:
            await asyncio.to_thread(package.hash_all)
        except BaseException:
            package.close()
            raise
        log.info("hashed every chunk of %s in %.2fs", package_path, time.monotonic() - started)
    try:
        server = ChunkServer(provider)
        if served is not None:
            served.attach_server(server)
        (host, port), *more = addresses
        try:
            await server.start(host, port, ssl=tls, token=token, more=more,
                               local_token=local_token)  # fmt: skip
        except OSError as e:
            where = ", ".join(wire.format_addr(h or "*", p) for h, p in addresses)
            if e.errno == errno.EADDRINUSE:
                raise DrafterError(f"cannot listen on {where}: address already in use") from None
            raise DrafterError(f"cannot listen on {where}: {e.strerror or e}") from None
        try:
            shown = ", ".join(wire.format_addr(h or "*", p) for h, p in _bound(server, addresses))
            if token is None and local_token is None:
                log.warning("no token: anyone who can reach %s can read %s", shown, package_path)
            print(f"serving {package_path} on {shown}", flush=True)
            await stop.wait()
            log.debug("stopping")
        finally:
            await server.close()
    finally:
        if isinstance(provider, ObjectProvider):
            await provider.close()
        elif isinstance(provider, PackageProvider):
            provider.close()


def _bound(server: ChunkServer, addresses: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The addresses as asked for, with the ports actually bound (port 0 = any)."""
    ports = [int(a.rsplit(":", 1)[1]) for a in server.addresses]
    return [(h, ports[i] if i < len(ports) else p) for i, (h, p) in enumerate(addresses)]


def main(argv: list[str] | None = None) -> int:
    """Entry point of drafter-registry."""
    p = cli.parser(PROG, "Serve a package's resources over the network (read-only).")
    p.add_argument("--package-path", default="out/app.drft",
                   help="the package: a file, s3://BUCKET/KEY or http(s)://HOST/PATH")  # fmt: skip
    p.add_argument(
        "--laddr",
        default=None,
        help=f"address to listen on (HOST:PORT; :PORT = all interfaces; default {DEFAULT_LADDR}, "
        "loopback only without a token)",
    )
    p.add_argument(
        "--token-file",
        help=f"file holding the shared token clients must know (else ${security.TOKEN_ENV}); "
        "make one with drafter-token",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback address without a token (anyone who connects reads it)",
    )
    p.add_argument("--tls-cert", help="PEM certificate: serve over TLS (needs --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument(
        "--chunk-size", type=int, default=None,
        help=f"bytes per chunk on the wire (default {DEFAULT_CHUNK_SIZE}; an object's index "
        "sets its own)",
    )  # fmt: skip
    p.add_argument("--tls-ca", default="", help="CA certificate of an https:// package's server")
    p.add_argument("--retry-timeout", type=float, default=30,
                   help="seconds the store client retries one request at start")  # fmt: skip
    storeflags.add(p, writes=False)
    storeflags.add_pin(p)
    for resource, port in RESOURCE_LADDRS.items():
        p.add_argument(
            f"--{resource}-laddr",
            default=None,
            help=f"serve here too, for peers given --{resource}-raddr (without --laddr and "
            f"every --*-laddr, also :{port} as in the seed)",
        )
    cli.add_metrics_flags(p)
    a = p.parse_args(argv)
    cli.setup_logging(a.verbose)

    def body() -> int:
        if a.chunk_size is not None and (
            not 0 < a.chunk_size <= wire.MAX_CHUNK_SIZE or a.chunk_size % 4096
        ):
            raise DrafterError(
                f"--chunk-size must be a multiple of 4096 up to {wire.MAX_CHUNK_SIZE}"
            )
        token = security.load_token(a.token_file)
        addresses = [security.listen_address(a.laddr, DEFAULT_LADDR, token, a.insecure)]
        given = {r: getattr(a, f"{r}_laddr") for r in RESOURCE_LADDRS}
        seed_defaults = a.laddr is None and all(v is None for v in given.values())
        for resource, port in RESOURCE_LADDRS.items():
            laddr = given[resource]
            if laddr is not None or seed_defaults:
                default = f":{port}"
                flag = f"--{resource}-laddr"
                address = security.listen_address(laddr, default, token, a.insecure, flag)
                if address not in addresses:
                    addresses.append(address)
        tls = security.tls_server_options(a.tls_cert, a.tls_key)
        served = metrics.start(a.metrics, a.metrics_public)
        if is_object_url(a.package_path):
            parse_location(a.package_path, "--package-path")  # one line if unusable
        elif a.tls_ca or a.index_digest or a.s3_virtual_hosted:
            raise DrafterError(
                "--tls-ca, --index-digest and --s3-virtual-hosted are for an s3:// or "
                "http(s):// --package-path"
            )
        if not 0.0 < a.retry_timeout <= 86400:
            raise DrafterError("--retry-timeout must be above 0 and at most 86400 seconds")
        store = storeflags.store_options(a, a.retry_timeout)
        # Loopback without a token: only accounts that can read the host-local one.
        local_token = None if token or a.insecure else localtoken.for_serving()
        asyncio.run(
            _serve(
                a.package_path, addresses, token, tls, a.chunk_size, served, store,
                a.index_digest, local_token,
            )
        )  # fmt: skip
        return 0

    return cli.run(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
