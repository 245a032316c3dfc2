"""drafter-registry: serve a package's resources over the network, read-only."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import ssl
import time
from pathlib import Path

from drafter import cli, metrics
from drafter.errors import DrafterError
from drafter.package import open_package
from drafter.transport import protocol as wire
from drafter.transport import security
from drafter.transport.registry import DEFAULT_CHUNK_SIZE, PackageProvider
from drafter.transport.server import ChunkServer

PROG = "drafter-registry"
DEFAULT_LADDR = ":1337"
# The seed's per-resource addresses (drafter-peer --state-raddr localhost:1600 ...).
RESOURCE_LADDRS = {"state": 1600, "memory": 1601, "initramfs": 1602, "kernel": 1603, "disk": 1604}
log = logging.getLogger(__name__)


async def _serve(
    package_path: Path,
    addresses: list[tuple[str, int]],
    token: str | None,
    tls: ssl.SSLContext | None,
    chunk_size: int,
    served: metrics.Metrics | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    provider = PackageProvider(open_package(package_path), chunk_size)
    try:
        started = time.monotonic()
        await asyncio.to_thread(provider.hash_all)
        log.info("hashed every chunk of %s in %.2fs", package_path, time.monotonic() - started)
        server = ChunkServer(provider)
        if served is not None:
            served.attach_server(server)
        (host, port), *more = addresses
        try:
            await server.start(host, port, ssl=tls, token=token, more=more)
        except OSError as e:
            where = ", ".join(wire.format_addr(h or "*", p) for h, p in addresses)
            if e.errno == errno.EADDRINUSE:
                raise DrafterError(f"cannot listen on {where}: address already in use") from None
            raise DrafterError(f"cannot listen on {where}: {e.strerror or e}") from None
        try:
            shown = ", ".join(wire.format_addr(h or "*", p) for h, p in _bound(server, addresses))
            if token is None:
                log.warning("no token: anyone who can reach %s can read %s", shown, package_path)
            print(f"serving {package_path} on {shown}", flush=True)
            await stop.wait()
            log.debug("stopping")
        finally:
            await server.close()
    finally:
        provider.close()


def _bound(server: ChunkServer, addresses: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The addresses as asked for, with the ports actually bound (port 0 = any)."""
    ports = [int(a.rsplit(":", 1)[1]) for a in server.addresses]
    return [(h, ports[i] if i < len(ports) else p) for i, (h, p) in enumerate(addresses)]


def main(argv: list[str] | None = None) -> int:
    """Entry point of drafter-registry."""
    p = cli.parser(PROG, "Serve a package's resources over the network (read-only).")
    p.add_argument("--package-path", default="out/app.drft", help="package to serve")
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
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="bytes per chunk on the wire"
    )
    for resource, port in RESOURCE_LADDRS.items():
        p.add_argument(
            f"--{resource}-laddr",
            default=None,
            help=f"serve here too, for peers given --{resource}-raddr (without --laddr and "
            f"every --*-laddr, also :{port} as in the seed)",
        )
    metrics.add_flag(p)
    a = p.parse_args(argv)
    cli.setup_logging(a.verbose)

    def body() -> int:
        if not 0 < a.chunk_size <= wire.MAX_CHUNK_SIZE or a.chunk_size % 4096:
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
        served = metrics.start(a.metrics)
        asyncio.run(_serve(Path(a.package_path), addresses, token, tls, a.chunk_size, served))
        return 0

    return cli.run(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
