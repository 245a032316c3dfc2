"""Wire v2 end to end: tokens beyond loopback, refused chunks, chunks not moved twice."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from support.common import (
    StderrWatch,
    assert_one_line_error,
    command,
    run_command,
    stop_process,
)
from support.net import CuttableProxy, free_port
from support.vms import (
    check_no_loss,
    finish_source,
    migrate,
    peer,
    registry,
    wait_for_redis,
    wait_resumed,
    writing,
)


def make_token(workdir: Path) -> Path:
    path = workdir / "drafter.token"
    result = run_command("drafter-token", str(path))
    assert result.returncode == 0, result.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    return path


def wire_mib(summary: str) -> float:
    match = re.search(r"([\d.]+) MiB on the wire", summary)
    assert match, summary
    return float(match.group(1))


def summary_of(proc, start: str = "migrated from") -> str:
    """A peer's summary line: a migration's, or with ``start="started from"`` a lazy
    start's (printed once every chunk is local)."""
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, ""):
        if line.startswith(start):
            return line.strip()
    raise AssertionError("no summary line")


def test_cluster_walkthrough_with_a_token_and_the_hash_skip_back_home(
    seeded_package, network, workdir
) -> None:
    """The README's cluster commands (all interfaces, a token file on every command);
    the hop back to a host that holds the registry's package moves fewer bytes."""
    token = make_token(workdir)
    tf = ("--token-file", str(token))
    # Without the token the same all-interfaces address is refused, in one line.
    refused = run_command("drafter-registry", "--package-path", str(seeded_package),
                          "--laddr", f":{free_port()}")  # fmt: skip
    assert_one_line_error(refused, "without a token", "drafter-token")
    port = free_port()
    reg = subprocess_start(
        "drafter-registry", "--package-path", str(seeded_package), "--laddr", f":{port}", *tf
    )
    address0 = network.info(0).external_address
    ports = [free_port() for _ in range(3)]
    with contextlib.ExitStack() as stack:
        stack.callback(stop_process, reg)
        first = stack.enter_context(
            migrate(f"127.0.0.1:{port}", network.name(0), workdir, f":{ports[0]}", *tf)
        )
        wait_resumed(first)
        assert wait_for_redis(address0).get("from") == b"the package"
        # A peer without the token is turned away with a hint.
        refused = run_command("drafter-peer", "--netns", network.name(1), "--raddr",
                              f"127.0.0.1:{ports[0]}", "--laddr", "",
                              "--work-dir", str(workdir / "vms"))  # fmt: skip
        assert_one_line_error(refused, "requires a token")
        second = stack.enter_context(
            migrate(f"127.0.0.1:{ports[0]}", network.name(1), workdir, f":{ports[1]}", *tf)
        )
        wait_resumed(second)
        away = summary_of(second)
        finish_source(first)
        assert wait_for_redis(network.info(1).external_address).get("from") == b"the package"
        home = stack.enter_context(
            migrate(
                f"127.0.0.1:{ports[1]}",
                network.name(0),
                workdir,
                f":{ports[2]}",
                *tf,
                "--local-package",
                str(seeded_package),
            )  # fmt: skip
        )
        wait_resumed(home)
        back = summary_of(home)
        finish_source(second)
        assert wait_for_redis(address0).get("from") == b"the package"
        assert "reused from a local package" in back, back
        assert wire_mib(back) < wire_mib(away) / 2, (away, back)
        home.send_signal(signal.SIGINT)
        home.communicate(timeout=60)
        assert home.returncode == 0


def subprocess_start(*argv: str):
    import subprocess

    proc = subprocess.Popen([command(argv[0]), *argv[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "serving" in line, line + (proc.stderr.read() if proc.stderr else "")
    return proc


class FlippingProxy(threading.Thread):
    """Forwards one TCP connection at a time; flips one bit of the server's bytes at
    ``offset`` (counted over each connection's server-to-client stream)."""

    def __init__(self, target: int, offset: int) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.offset = offset
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flipped = 0
        self.start()

    def run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target))
                threading.Thread(
                    target=self.pipe, args=(client, server, False), daemon=True
                ).start()
                threading.Thread(target=self.pipe, args=(server, client, True), daemon=True).start()

    def pipe(self, src: socket.socket, dst: socket.socket, flip: bool) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if flip and seen <= self.offset < seen + len(data):
                    buf = bytearray(data)
                    buf[self.offset - seen] ^= 0x01
                    data = bytes(buf)
                    self.flipped += 1
                seen += len(data)
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


@contextlib.contextmanager
def flipping(target: int, offset: int) -> Iterator[FlippingProxy]:
    proxy = FlippingProxy(target, offset)
    try:
        yield proxy
    finally:
        proxy.close()


def test_a_flipped_bit_in_flight_is_refused(seeded_package, network, workdir) -> None:
    """No TLS, a token: one bit changed on the way makes the peer refuse, and say so."""
    token = make_token(workdir)
    with registry(seeded_package, "--token-file", str(token)) as (_, raddr):
        port = int(raddr.rsplit(":", 1)[1])
        # 2 MiB into the stream: past the hello, manifest and hashes, inside chunk bytes.
        with flipping(port, 2 << 20) as proxy:
            result = run_command("drafter-peer", "--netns", network.name(0), "--raddr",
                                 f"127.0.0.1:{proxy.port}", "--laddr", "",
                                 "--token-file", str(token), "--retry-timeout", "2",
                                 # raw chunk bytes: the flip reaches the hash check (a
                                 # compressed one may fail to decompress first)
                                 "--compress", "none",
                                 "--work-dir", str(workdir / "vms"), timeout=120)  # fmt: skip
            assert proxy.flipped == 1
        assert_one_line_error(result)
        last = result.stderr.strip().splitlines()[-1]
        assert "failed verification" in last or "failed authentication" in last, last
        assert "refused" in last or "failed authentication" in last, last


def post_copy_through(proxy: CuttableProxy, network, workdir: Path, failpoints: str = ""):
    """A destination in namespace 1 that migrates the VM through ``proxy``, resuming
    at once (pure post-copy), and rides out cuts for 30 s."""
    import os

    env = {**os.environ, "DRAFTER_FAILPOINTS": failpoints}
    return peer(f"127.0.0.1:{proxy.port}", network.name(1), workdir, "--precopy-rounds", "0",
                "--retry-timeout", "30", laddr="", env=env)  # fmt: skip


def test_a_cut_during_post_copy_is_recovered_not_rescued(seeded_package, network, workdir) -> None:
    """The link to the source drops right after switch-over: the destination comes back
    with the migration's id, the source keeps the migration its own instead of resuming
    the VM itself, and the migration completes with no acknowledged write lost."""
    addresses = [network.info(i).external_address for i in range(2)]
    with registry(seeded_package) as (_, raddr), contextlib.ExitStack() as stack:
        port = free_port()
        source = stack.enter_context(
            migrate(raddr, network.name(0), workdir, f"127.0.0.1:{port}", "--rescue-timeout", "4")
        )
        wait_resumed(source)
        watch = StderrWatch(source)
        wait_for_redis(addresses[0]).delete("log")
        proxy = CuttableProxy(port)
        stack.callback(proxy.close)
        with writing(addresses) as writer:
            dest = stack.enter_context(post_copy_through(proxy, network, workdir))
            watch.wait_for("switched over")
            proxy.cut()
            wait_resumed(dest)
            out, err = source.communicate(timeout=120)
            assert source.returncode == 0, err
            assert "migrated away" in out
            assert not any("resuming the VM here" in line for line in watch.lines), watch.lines
            # Back after the cut: with the answer (RESUME), or asking for it again.
            back = ("is back", "asked again")
            assert any(b in line for line in watch.lines for b in back), watch.lines
        assert proxy.cuts == 1
        check_no_loss(addresses[1], writer)
        dest.send_signal(signal.SIGINT)
        dest.communicate(timeout=60)
        assert dest.returncode == 0


def test_auto_compression_is_off_on_loopback_only(network, workdir) -> None:
    """--compress auto: raw bytes to a server on this host's loopback (the CPU is the
    limit there), zstd to any other address (here the host end of a namespace's veth)."""
    import asyncio

    from drafter.package import open_package
    from drafter.transport.client import RemoteSource
    from drafter.transport.registry import PackageProvider
    from drafter.transport.server import ChunkServer
    from support.wire import build_package

    package = open_package(build_package(workdir))

    async def compressed(host: str) -> bool:
        provider = PackageProvider(package, 64 * 1024)
        server = ChunkServer(provider)
        await server.start(host, 0)
        source = RemoteSource(f"{host}:{server.port}")
        try:
            await source.connect()
            data = await source.fetch("initramfs", 0)  # text: compresses well
            assert data == package.read("initramfs")[: 64 * 1024]
            return source.compressed and source.stats.wire_bytes < source.stats.bytes
        finally:
            await source.close()
            await server.close()
            provider.close()

    assert asyncio.run(compressed("127.0.0.1")) is False
    assert asyncio.run(compressed(network.info(0).host_address)) is True


def test_a_destination_the_source_gave_up_on_stops(seeded_package, network, workdir) -> None:
    """The link goes down at switch-over and stays down for longer than the source's
    rescue timeout: the source resumes the VM itself, and the destination stops (it
    lost the switch-over answer, or its RESUME is refused), so only one copy of the
    VM answers."""
    import time

    addresses = [network.info(i).external_address for i in range(2)]
    with registry(seeded_package) as (_, raddr), contextlib.ExitStack() as stack:
        port = free_port()
        source = stack.enter_context(
            migrate(raddr, network.name(0), workdir, f"127.0.0.1:{port}", "--rescue-timeout", "2")
        )
        wait_resumed(source)
        watch = StderrWatch(source)
        proxy = CuttableProxy(port)
        stack.callback(proxy.close)
        # The hand-over is asked 3 s late: the cut lands before it.
        dest = stack.enter_context(
            post_copy_through(proxy, network, workdir, "before-handover:delay=3")
        )
        watch.wait_for("switched over")
        proxy.refuse_until = time.monotonic() + 6
        proxy.cut()
        watch.wait_for("resuming the VM here", timeout=30)
        _, err = dest.communicate(timeout=60)
        assert dest.returncode != 0
        assert "error:" in err.strip().splitlines()[-1], err
        assert wait_for_redis(addresses[0]).ping()  # the source's copy runs
        with contextlib.suppress(Exception):  # and the destination's does not
            import redis

            answered = redis.Redis(host=addresses[1], socket_timeout=0.5,
                                   socket_connect_timeout=0.5).ping()  # fmt: skip
            raise AssertionError(f"the destination still answers: {answered}")
        assert source.poll() is None


def test_a_hop_on_a_host_that_holds_the_chunks_moves_no_kernel_initramfs_or_disk(
    seeded_package, network, workdir
) -> None:
    """With --chunk-cache on both peers, what the first pulled from the registry fills
    the host's cache; the hop to the second peer on this host takes the kernel, the
    initramfs and the unchanged disk from it (the data written before the hop moves)."""
    cache = ("--chunk-cache", str(workdir / "chunk-cache"))
    port = free_port()
    with contextlib.ExitStack() as stack:
        _, raddr = stack.enter_context(registry(seeded_package))
        first = stack.enter_context(
            migrate(raddr, network.name(0), workdir, f"127.0.0.1:{port}", *cache)
        )
        wait_resumed(first)
        started = summary_of(first, "started from")  # every chunk local: the cache holds them all
        assert "from the host's chunk cache" not in started, started
        wait_for_redis(network.info(0).external_address).set("before the hop", "kept")
        second = stack.enter_context(
            migrate(f"127.0.0.1:{port}", network.name(1), workdir, "", *cache)
        )
        wait_resumed(second)
        hop = summary_of(second)
        finish_source(first)
        client = wait_for_redis(network.info(1).external_address)
        assert client.get("from") == b"the package"
        assert client.get("before the hop") == b"kept"
        assert "kernel 0.0 MiB, initramfs 0.0 MiB" in hop, hop
        assert "from the host's chunk cache" in hop, hop
        disk = re.search(r"disk ([\d.]+) MiB", hop)
        assert disk and float(disk.group(1)) < 1, hop  # only what the VM wrote
