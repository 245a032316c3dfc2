"""Lazy start and data plane figures for registry → peer, printed as JSON.

1. Peer start to first Redis reply for 512 MiB and 2 GiB packages, beside the
   baseline a user would otherwise use: copy the whole package, then start it with
   drafter-runner (copy time + runner start to first reply).
2. Bulk pull throughput on loopback: RemoteSource pulling a dense 256 MiB resource
   (runs of 16 chunks per request, as a peer pulls, within the client's window)
   from a registry subprocess, beside a plain TCP copy of the same bytes (sendfile
   to recv_into) in the same run.

Run as root: .venv/bin/python bench/peer.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import BIN, first_reply, free_port, make_package
from drafter.chunks import Priority
from drafter.network import Network, NetworkConfig
from drafter.package import PackageConfig, write_package
from drafter.transport.client import RemoteSource

MIB = 1 << 20
EXTRA: list[str] = []  # extra drafter-registry arguments


def start_registry(package: Path) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen(
        [BIN / "drafter-registry", "--package-path", str(package),
         "--laddr", f"127.0.0.1:{port}", *EXTRA],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc, f"127.0.0.1:{port}"


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def timed_start(argv: list[str], address: str) -> float:
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        first_reply(address)
        return time.monotonic() - start
    finally:
        stop(proc)


def lazy_start(work: Path, bp: Path, ns: str, address: str, rounds: int) -> dict[str, object]:
    results: dict[str, object] = {}
    for mib in (512, 2048):
        package = work / f"redis-{mib}.drft"
        make_package(bp, ns, mib, package)
        registry, raddr = start_registry(package)
        try:
            peer = [
                timed_start(
                    [
                        str(BIN / "drafter-peer"),
                        "--netns",
                        ns,
                        "--raddr",
                        raddr,
                        "--work-dir",
                        str(work / "vms"),
                    ],
                    address,
                )  # fmt: skip
                for _ in range(rounds)
            ]
        finally:
            stop(registry)
        baseline = []
        for _ in range(rounds):
            copy = work / "copy.drft"
            subprocess.run(["sync"], check=True)
            start = time.monotonic()
            subprocess.run(["cp", "--sparse=always", str(package), str(copy)], check=True)
            copied = time.monotonic() - start
            run = timed_start(
                [str(BIN / "drafter-runner"), "--netns", ns, "--package-path", str(copy),
                 "--persist=false"],
                address,
            )  # fmt: skip
            baseline.append(copied + run)
            copy.unlink()
        results[f"{mib}MiB"] = {
            "peer_start_to_first_reply_s": round(statistics.median(peer), 3),
            "copy_then_runner_to_first_reply_s": round(statistics.median(baseline), 3),
            "package_bytes": package.stat().st_size,
            "package_bytes_on_disk": package.stat().st_blocks * 512,
        }
        package.unlink()
    small = results["512MiB"]["peer_start_to_first_reply_s"]  # type: ignore[index]
    large = results["2048MiB"]["peer_start_to_first_reply_s"]  # type: ignore[index]
    results["peer_ratio_2048_to_512"] = round(large / small, 3)
    return results


def dense_package(work: Path, mib: int) -> Path:
    files = {}
    for name in ("state", "kernel", "initramfs", "disk"):
        path = work / f"dense-{name}"
        path.write_bytes(b"x" * 4096)
        files[name] = path
    memory = work / "dense-memory"
    with memory.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
    files["memory"] = memory
    package = work / "dense.drft"
    write_package(package, PackageConfig(mib, 1, "", "02:00:00:00:00:01"), dict(files))
    for path in files.values():
        path.unlink()
    return package


async def pull(raddr: str, workers: int, run: int = 16) -> tuple[float, int]:
    """Pull the memory resource the way a peer's background pull does: runs of ``run``
    consecutive chunks per request, at most ``workers`` requests at once, within the
    client's window; every chunk verified and written to /dev/null."""
    remote = RemoteSource(raddr)
    await remote.connect()
    size = remote.manifest["memory"]
    chunks = remote.chunks("memory")
    hashes = remote.hashes["memory"]
    fd = os.open(os.devnull, os.O_WRONLY)
    queue = [(i, min(run, chunks - i)) for i in range(0, chunks, run)]
    queue.reverse()
    start = time.monotonic()

    def deliver(_index: int, data: object, _hash: bytes) -> None:
        os.write(fd, data)  # type: ignore[arg-type]

    async def worker() -> None:
        while queue:
            first, count = queue.pop()
            expected: list[bytes | None] = list(hashes[first : first + count])
            await remote.fetch_run("memory", first, count, Priority.BACKGROUND, expected, deliver)

    await asyncio.gather(*(worker() for _ in range(workers)))
    took = time.monotonic() - start
    os.close(fd)
    await remote.close()
    return took, size


def plain_tcp_copy(package: Path, offset: int, size: int) -> float:
    """Send the same bytes with sendfile over loopback; the receiver reads them all."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def send() -> None:
        conn, _ = server.accept()
        with conn, package.open("rb") as f:
            conn.sendfile(f, offset, size)

    thread = threading.Thread(target=send)
    thread.start()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as client:
        buf = bytearray(4 * MIB)
        got = 0
        while got < size:
            n = client.recv_into(buf)
            if not n:
                break
            got += n
    took = time.monotonic() - start
    thread.join()
    server.close()
    assert got == size
    return took


def data_plane(work: Path, rounds: int) -> dict[str, object]:
    from drafter.package import open_package

    package = dense_package(work, 256)
    member = open_package(package).members["memory"]
    subprocess.run(["cat", str(package)], stdout=subprocess.DEVNULL, check=True)  # warm cache
    registry, raddr = start_registry(package)
    try:
        ours = [asyncio.run(pull(raddr, 512)) for _ in range(rounds)]
    finally:
        stop(registry)
    tcp = [plain_tcp_copy(package, member.offset, member.size) for _ in range(rounds)]
    ours_mbs = statistics.median(size / t / MIB for t, size in ours)
    tcp_mbs = statistics.median(member.size / t / MIB for t in tcp)
    return {
        "bytes": member.size,
        "drafter_pull_MiB_per_s": round(ours_mbs, 1),
        "plain_tcp_copy_MiB_per_s": round(tcp_mbs, 1),
        "ratio_drafter_to_tcp": round(ours_mbs / tcp_mbs, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--blueprint", default="out/blueprint")
    p.add_argument("--data-plane-only", action="store_true", help="skip the VM starts")
    args = p.parse_args()
    Path("out").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="drafter-bench-", dir="out") as tmp:
        work = Path(tmp)
        config = NetworkConfig(
            namespace_prefix="dbpeer",
            namespace_count=1,
            host_veth_cidr="10.244.0.0/24",
            namespace_veth_cidr="10.245.0.0/24",
            state_dir=str(work / "net"),
        )
        results: dict[str, object] = {"data_plane": data_plane(work, args.rounds)}
        if args.data_plane_only:
            print(json.dumps(results, indent=2))
            return
        with Network(config) as net:
            ns = net.namespaces[0]
            results["lazy_start"] = lazy_start(
                work, Path(args.blueprint), ns.namespace, ns.external_address, args.rounds
            )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
