"""drafter-registry: serve a package's resources over the network, read-only."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import ssl
from pathlib import Path

from drafter import cli, wire
from drafter.errors import DrafterError
from drafter.package import open_package
from drafter.registry import DEFAULT_CHUNK_SIZE, PackageProvider
from drafter.server import ChunkServer

PROG = "drafter-registry"
log = logging.getLogger(__name__)


async def _serve(
    package_path: Path,
    host: str,
    port: int,
    token: str | None,
    tls: ssl.SSLContext | None,
    chunk_size: int,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    provider = PackageProvider(open_package(package_path), chunk_size)
    server = ChunkServer(provider)
    try:
        try:
            await server.start(host, port, ssl=tls, token=token)
        except OSError as e:
            where = wire.format_addr(host or "*", port)
            if e.errno == errno.EADDRINUSE:
                raise DrafterError(f"cannot listen on {where}: address already in use") from None
            raise DrafterError(f"cannot listen on {where}: {e.strerror or e}") from None
        shown = wire.format_addr(host or "*", server.port)
        if token is None:
            log.warning(
                "no token given (--token-file or $%s): anyone who can reach %s can read %s",
                wire.TOKEN_ENV, shown, package_path,
            )  # fmt: skip
        print(f"serving {package_path} on {shown}", flush=True)
        await stop.wait()
        log.debug("stopping")
    finally:
        await server.close()
        provider.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of drafter-registry."""
    p = cli.parser(PROG, "Serve a package's resources over the network (read-only).")
    p.add_argument("--package-path", default="out/app.drft", help="package to serve")
    p.add_argument(
        "--laddr", default=":1337", help="address to listen on (HOST:PORT; :PORT = all interfaces)"
    )
    p.add_argument(
        "--token-file",
        help=f"file holding the shared token clients must know (else ${wire.TOKEN_ENV})",
    )
    p.add_argument("--tls-cert", help="PEM certificate: serve over TLS (needs --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="bytes per chunk on the wire"
    )
    a = p.parse_args(argv)
    cli.setup_logging(a.verbose)

    def body() -> int:
        host, port = wire.parse_addr(a.laddr, "--laddr")
        if not 0 < a.chunk_size <= wire.MAX_CHUNK_SIZE or a.chunk_size % 4096:
            raise DrafterError(
                f"--chunk-size must be a multiple of 4096 up to {wire.MAX_CHUNK_SIZE}"
            )
        token = wire.load_token(a.token_file)
        tls = None
        if a.tls_cert or a.tls_key:
            if not (a.tls_cert and a.tls_key):
                raise DrafterError("--tls-cert and --tls-key go together")
            tls = wire.server_ssl_context(a.tls_cert, a.tls_key)
        asyncio.run(_serve(Path(a.package_path), host, port, token, tls, a.chunk_size))
        return 0

    return cli.run(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
