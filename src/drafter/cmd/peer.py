"""drafter-peer: start a VM from a registry without downloading it first."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from drafter import cli, console
from drafter.chunks import FETCHED
from drafter.cmd import storeflags
from drafter.errors import DrafterError
from drafter.network import follow
from drafter.objects.location import is_object_url, parse_location
from drafter.peer import Peer, PeerOptions, PullProgress
from drafter.transport import localtoken, security
from drafter.transport import protocol as wire

if TYPE_CHECKING:
    from drafter.metrics import Metrics

PROG = "drafter-peer"
DEFAULT_LADDR = ":1338"
DEFAULT_PEER = "localhost:1338"  # where a peer on this host serves its VM by default
DEFAULT_REGISTRY = "localhost:1337"
RESOURCES = FETCHED  # each may come from a server of its own (--RESOURCE-raddr)


async def _listening(addr: str) -> bool:
    """Whether something accepts connections at ``addr``."""
    host, port = wire.parse_addr(addr)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


log = logging.getLogger("drafter")


def progress_reporter(peer: Peer) -> tuple[object, contextlib.AbstractContextManager[object]]:
    """A rich progress bar on a terminal, plain log lines every 25 % otherwise."""
    if sys.stderr.isatty():
        bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            transient=False,
        )
        task = bar.add_task("pulling", total=1)

        def update(p: PullProgress) -> None:
            bar.update(task, total=p.total, completed=p.done)

        peer.on_progress = update
        return bar, bar
    marks = {25, 50, 75, 100}

    def log_line(p: PullProgress) -> None:
        if not p.total:
            return
        pct = p.done * 100 // p.total
        crossed = {m for m in marks if pct >= m}
        if crossed:  # one line, with the true figures, however many marks were passed
            marks.difference_update(crossed)
            log.info("pulled %d%% (%d of %d MiB)", pct, p.done >> 20, p.total >> 20)

    peer.on_progress = log_line
    return None, contextlib.nullcontext()


def _metrics(addr: str | None, public: bool) -> Metrics | None:
    """drafter.metrics.start, imported only with --metrics (prometheus_client takes
    30 ms of the peer's start, which a lazy start waits for)."""
    if addr is None:
        return None
    from drafter import metrics

    return metrics.start(addr, public)


async def run(a: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    token = security.load_token(a.token_file)
    laddr = ""
    if a.laddr != "":
        host, port = security.listen_address(a.laddr, DEFAULT_LADDR, token, a.insecure)
        laddr = wire.format_addr(host, port)
    security.tls_server_options(a.tls_cert or None, a.tls_key or None)  # checked up front
    if a.stable_address:  # the host's side now, before connecting; its holder at start
        address = follow.parse_stable_address(a.stable_address)
        await asyncio.to_thread(follow.check_stable_address, address, a.state_dir, True)
    raddrs = {r: getattr(a, f"{r}_raddr") for r in RESOURCES if getattr(a, f"{r}_raddr")}
    raddr = a.raddr
    if raddr is None:
        raddr = DEFAULT_REGISTRY
        if len(raddrs) < len(RESOURCES) and await _listening(DEFAULT_PEER):
            # As in the seed: with no remote named, a peer serving on this host is
            # where the VM comes from (a migration to here).
            raddr = DEFAULT_PEER
            log.info("migrating the VM served at %s to here", raddr)
    for where in (raddr, *raddrs.values()):
        if is_object_url(where):
            parse_location(where, "--raddr")  # one line now if it is not a usable URL
    checkpoint = a.checkpoint or None
    if checkpoint is not None and a.package_output_path:
        raise DrafterError(
            "--checkpoint and --package-output-path: choose one (a VM's checkpoints "
            "are resumed with --raddr s3://BUCKET/PREFIX)"
        )
    output = None
    if a.package_output_path:
        output = storeflags.output(a, a.package_output_path)
        await output.check()
    options = PeerOptions(
        index_pin=a.index_digest,
        s3_virtual_hosted=a.s3_virtual_hosted,
        raddr=raddr,
        raddrs=raddrs,
        netns=a.netns or None,
        token=token,
        # Loopback without a token: only accounts that can read the host-local one.
        local_token=None if token or a.insecure or not laddr else localtoken.for_serving(),
        tls_ca=a.tls_ca or None,
        pull_workers=a.pull_workers,
        resume_threshold=a.resume_threshold,
        resume_timeout=a.resume_timeout,
        retry_timeout=a.retry_timeout,
        accel=a.accel,
        work_root=Path(a.work_dir),
        laddr=laddr,
        tls_cert=a.tls_cert or None,
        tls_key=a.tls_key or None,
        precopy_rounds=a.precopy_rounds,
        precopy_bytes=int(a.precopy_threshold * (1 << 20)),
        grace=a.rescue_timeout or None,
        offer_timeout=a.offer_timeout,
        precopy_timeout=a.precopy_timeout,
        handover_timeout=a.handover_timeout,
        compress=a.compress,
        local_package=Path(a.local_package) if a.local_package else None,
        metrics=_metrics(a.metrics, a.metrics_public),
        state_dir=a.state_dir,
        stable_address=a.stable_address or None,
        chunk_cache=Path(a.chunk_cache) if a.chunk_cache else None,
        checkpoint=checkpoint,
        checkpoint_interval=a.checkpoint_interval,
        checkpoint_keep=a.checkpoint_keep,
        lease_time=a.lease_time,
    )
    peer = Peer(options)
    _, bar = progress_reporter(peer)
    taking_back: set[asyncio.Task[None]] = set()

    async def take_back() -> None:
        try:
            log.warning("%s", await peer.take_back())
        except Exception as e:  # said, not raised: the peer keeps running either way
            log.error("could not take the VM back: %s", e)

    def on_usr1() -> None:  # the operator: resume the VM here while its destination is away
        task = asyncio.ensure_future(take_back())
        taking_back.add(task)
        task.add_done_callback(taking_back.discard)

    loop.add_signal_handler(signal.SIGUSR1, on_usr1)

    def on_usr2() -> None:  # the status line of the checkpoints, and one at once
        if peer.checkpoints is not None:
            print(peer.checkpoints.status(), flush=True)
        peer.checkpoint_now()

    loop.add_signal_handler(signal.SIGUSR2, on_usr2)
    try:
        with bar:
            took = await peer.start()
            if peer.recovered:
                print(peer.recovered, flush=True)
            print(f"resumed the VM from {raddr} in {took * 1000:.0f} ms", flush=True)
            if peer.server is not None:
                print(f"serving the VM on {', '.join(peer.server.addresses)}", flush=True)
            elif laddr:
                print(f"serving the VM on {laddr} once the source has left it", flush=True)
            assert peer.machine is not None
            attach = asyncio.create_task(
                console.attach(peer.machine.console_socket, a.enable_input, a.enable_output)
            )
            pulled = asyncio.ensure_future(peer.wait_pulled())
            stopped = asyncio.ensure_future(stop.wait())
            away = asyncio.ensure_future(peer.migrated_away.wait())
            back = asyncio.ensure_future(peer.taken_back.wait())
            fenced = asyncio.ensure_future(peer.fenced.wait())
            raw = console.raw_terminal(sys.stdin.fileno()) if a.enable_input else None
            with raw or contextlib.nullcontext():
                waiting = {pulled, stopped, away, back, fenced}
                while not (stopped.done() or away.done() or back.done() or fenced.done()):
                    done, waiting = await asyncio.wait(waiting, return_when="FIRST_COMPLETED")
                    if pulled in done:
                        pulled.result()  # raises if the pull failed
                        p = peer.progress
                        log.info("all %d MiB local after %.1fs", p.total >> 20,
                                 (p.finished or p.started) - p.started)  # fmt: skip
                        print(peer.summary.line(), flush=True)
            attach.cancel()
            for task in (pulled, stopped, away, back, fenced):
                task.cancel()
        if fenced.done():
            raise DrafterError(peer.fenced_reason)
        if away.done():
            print("the VM migrated away; stopping here", flush=True)
            return 0
        if back.done():
            raise DrafterError(
                "the source resumed the VM itself after losing this destination; "
                "stopped the copy here (its writes since the switch-over are lost)"
            )
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: None)  # finish stopping first
        said = await peer.stop_checkpoints(final=True)
        if said:
            print(said, flush=True)
        if output is not None:
            try:
                await peer.write_package(output.local)
                await output.publish()
            finally:
                output.discard()
            print(f"package written to {a.package_output_path}", flush=True)
    finally:
        await peer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(PROG, __doc__.split(": ", 1)[1])
    p.add_argument("--netns", default="ark0", help="network namespace for the VM")
    follow.add_flags(p)
    p.add_argument(
        "--raddr", default=None,
        help="registry to start from (HOST:PORT), a package in object storage "
        "(s3://BUCKET/KEY, https://HOST/PATH), or peer to migrate the VM from (default: a peer "
        f"serving on {DEFAULT_PEER} if there is one, else {DEFAULT_REGISTRY})",
    )  # fmt: skip
    for resource in RESOURCES:
        p.add_argument(f"--{resource}-raddr", default="",
                       help=f"server of the {resource} resource (default: --raddr)")  # fmt: skip
    p.add_argument("--laddr", default=None,
                   help=f"serve the VM here for the next migration ('' = don't; default "
                   f"{DEFAULT_LADDR}, loopback only without a token)")  # fmt: skip
    p.add_argument("--insecure", action="store_true",
                   help="serve a non-loopback --laddr without a token")  # fmt: skip
    p.add_argument("--tls-cert", default="", help="serve with TLS: certificate (PEM)")
    p.add_argument("--tls-key", default="", help="serve with TLS: private key (PEM)")
    p.add_argument(
        "--precopy-rounds", type=int, default=5, help="most pre-copy rounds (0: pure post-copy)"
    )
    p.add_argument("--precopy-threshold", type=float, default=8,
                   help="MiB dirtied in a round that ends pre-copy")  # fmt: skip
    p.add_argument("--offer-timeout", type=float, default=30,
                   help="seconds a destination may stay silent in pre-copy")  # fmt: skip
    p.add_argument("--precopy-timeout", type=float, default=600,
                   help="seconds a pre-copy may last from its offer to the switch-over "
                   "before the source ends it (the VM keeps running there)")  # fmt: skip
    p.add_argument("--rescue-timeout", type=float, default=30,
                   help="seconds a source waits for a destination lost after switch-over "
                   "and before the hand-over, then resumes the VM itself (0: only on "
                   "SIGUSR1, the operator's take-back)")  # fmt: skip
    p.add_argument("--handover-timeout", type=float, default=15,
                   help="seconds a destination asks for the hand-over before it gives "
                   "the migration up (the source resumes the VM)")  # fmt: skip
    p.add_argument(
        "--token-file", default="", help="shared token (else $DRAFTER_TOKEN); see drafter-token"
    )
    p.add_argument(
        "--compress", default="auto", choices=["auto", "zstd", "none"],
        help="compressed chunks (auto: unless the server is on this host, under 2 ms away)",
    )  # fmt: skip
    p.add_argument(
        "--local-package", default="",
        help="a package on this host: chunks with the same hash are not moved",
    )  # fmt: skip
    p.add_argument("--tls-ca", default="", help="CA certificate: connect with TLS")
    p.add_argument("--pull-workers", type=int, default=512,
                   help="most background requests (runs of up to 16 chunks) at once; "
                   "the window of bytes in flight bounds them too")  # fmt: skip
    p.add_argument(
        "--resume-threshold", type=float, default=1.0,
        help="fraction of the VM's data that may still be missing at resume "
        "(1: resume at once; 0: only once everything is local)",
    )  # fmt: skip
    p.add_argument("--resume-timeout", type=float, default=60, help="seconds for the resume")
    p.add_argument("--retry-timeout", type=float, default=30,
                   help="seconds to keep retrying a lost connection")  # fmt: skip
    p.add_argument("--package-output-path", default="",
                   help="on Ctrl-C, write the VM to this package first (a file or "
                   "s3://BUCKET/KEY)")  # fmt: skip
    storeflags.add(p, writes=True)
    storeflags.add_pin(p)
    p.add_argument("--chunk-cache", default="", metavar="DIR",
                   help="a directory this host's peers share: a chunk one of them "
                   "pulled (from any source, a migration's too) is not moved again")  # fmt: skip
    storeflags.add_checkpoint(p, "resume it on any host with --raddr s3://BUCKET/PREFIX")
    p.add_argument("--work-dir", default="out/vms", help="where the peer keeps its cache")
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    p.add_argument("--enable-input", action="store_true", help="terminal input to the console")
    p.add_argument("--enable-output", action="store_true", help="console output to stdout")
    cli.add_metrics_flags(p)
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)
    if not 0.0 <= args.resume_threshold <= 1.0:
        p.error("--resume-threshold must be between 0 and 1")
    for flag in ("offer_timeout", "precopy_timeout", "handover_timeout", "resume_timeout",
                 "retry_timeout"):  # fmt: skip
        if not 0.0 < getattr(args, flag) <= 86400:
            p.error(f"--{flag.replace('_', '-')} must be above 0 and at most 86400 seconds")
    if not 0.0 <= args.rescue_timeout <= 86400:
        p.error("--rescue-timeout must be between 0 and 86400 seconds")
    if not 0 <= args.precopy_rounds <= 1000:
        p.error("--precopy-rounds must be between 0 and 1000")
    if not 0.0 <= args.precopy_threshold <= 1 << 20:
        p.error("--precopy-threshold must be between 0 and 1048576 MiB")
    if not 1 <= args.pull_workers <= 4096:
        p.error("--pull-workers must be between 1 and 4096")
    storeflags.check_checkpoint(p, args)

    def body() -> int:
        cli.require_root(PROG)
        return asyncio.run(run(args))

    return cli.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
