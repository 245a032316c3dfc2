"""Live migration of a 512 MiB Redis VM under a steady write load, ours beside QEMU's.

Ours: a registry and a chain of drafter-peer hops between two namespaces (at least
10 migrations). QEMU's: the same guest migrated by QEMU's built-in live migration
(pre-copy, then post-copy) between two QEMU processes over a unix socket, with guest
RAM in files on /dev/shm (post-copy needs shared memory userfaultfd can serve).

For every migration: downtime as the VMM sees it (pause at the source to running at
the destination: ours from the peers' wall clocks, QEMU's from its STOP and RESUME
event timestamps) and as the client
sees it (longest gap between acknowledged writes during the migration), total
migration time and bytes moved; for ours also each switch-over step the destination's
summary names (BeforeSuspend, pause, state save, ..., first chunk served). Prints
JSON with p50/p95 of each.

``--rtt-ms 0 100`` runs everything once per round-trip time: above 0, every
migration connection (ours: destination to source peer; QEMU's: over TCP instead of
a unix socket) goes through bench/link.py, the WAN bench's link emulator (1 Gbit/s).

Run as root: .venv/bin/python bench/migration.py [--migrations 10] [--rtt-ms 0 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from qemu.qmp import EventListener
from redis.backoff import NoBackoff
from redis.retry import Retry

from common import BIN, first_reply, free_port, make_package
from drafter import snapshot
from drafter.network import Network, NetworkConfig
from drafter.vmm import MachineConfig, QemuMachine

MEMORY_MIB = 512
LINK = Path(__file__).resolve().parent / "link.py"


@contextlib.contextmanager
def link(target_port: int, rtt_ms: float, target_host: str = "127.0.0.1",
         listen_host: str = "127.0.0.1") -> Iterator[int]:  # fmt: skip
    """The port to connect to for ``target_port``: itself at 0 ms, else a link.py
    process with that round-trip time in front of it."""
    if rtt_ms <= 0:
        yield target_port
        return
    proc = subprocess.Popen(
        [sys.executable, str(LINK), "--target", f"{target_host}:{target_port}",
         "--listen", f"{listen_host}:0", "--rtt-ms", str(rtt_ms), "--rate-mbit", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on [0-9.]+:(\d+)", line)
        if match is None:
            raise RuntimeError(f"bench/link.py did not start: {line!r}")
        yield int(match.group(1))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def phases(summary: str) -> dict[str, float]:
    """The switch-over steps a destination's summary names, in ms."""
    match = re.search(r"switch-over to AfterResume \d+ ms: ([^)]*)\)", summary)
    out: dict[str, float] = {}
    for part in match.group(1).split(", ") if match else []:
        name, _, value = part.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[f"phase_{name.replace(' ', '_')}_ms"] = float(value)
    return out


class Writer(threading.Thread):
    """RPUSH 1, 2, 3, ... every few ms to whichever address answers; records ack times."""

    def __init__(self, addresses: list[str]) -> None:
        super().__init__(daemon=True)
        self.addresses = addresses
        self.acks: list[float] = []
        self.stop = threading.Event()

    @staticmethod
    def client(address: str) -> redis.Redis:
        # No retries inside redis-py: every failure shows as a gap.
        # Short timeouts: a stalled connection is noticed within 0.1 s, so the gaps
        # measure the VM's unavailability, not the client's patience.
        return redis.Redis(host=address, socket_timeout=0.1, socket_connect_timeout=0.05,
                           retry=Retry(NoBackoff(), 0))  # fmt: skip

    def run(self) -> None:
        value, current = 1, 0
        client = self.client(self.addresses[0])
        while not self.stop.is_set():
            try:
                client.rpush("log", value)
            except redis.RedisError:
                current = (current + 1) % len(self.addresses)
                client = self.client(self.addresses[current])
                continue
            self.acks.append(time.monotonic())
            value += 1
            time.sleep(0.002)

    def longest_gap(self, start: float, end: float) -> float:
        times = [t for t in self.acks if start <= t <= end]
        if len(times) < 2:
            return end - start
        return max(b - a for a, b in zip(times, times[1:], strict=False))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"migrations": len(runs)}
    for key in dict.fromkeys(k for r in runs for k in r):  # a step may be missing in a run
        values = [r[key] for r in runs if key in r]
        out[key] = {"p50": round(pct(values, 0.5), 4), "p95": round(pct(values, 0.95), 4)}
        if len(values) < len(runs):
            out[key]["runs"] = len(values)
    return out


def ours(work: Path, bp: Path, nets: list[Any], migrations: int, rtt_ms: float,
         stable: str | None = None, cache: bool = False) -> dict[str, Any]:  # fmt: skip
    """Our migrations; with ``stable`` the VM keeps that host address from hop to hop
    and the writer uses only it (docs/networking.md, "Following a VM"); with ``cache``
    every peer shares one host chunk cache (``--chunk-cache``, fresh for the run), so a
    hop moves only what this host does not hold."""
    package = work / "redis.drft"
    if not package.exists():
        make_package(bp, nets[0].namespace, MEMORY_MIB, package)
    # The namespaces' state, as a drafter-daemon keeps it: each hop closes the gate of
    # the address its VM left and cuts the host's connections there (docs/networking.md).
    follow = ["--state-dir", str(work / "net"), *(["--stable-address", stable] if stable else [])]
    if cache:
        shutil.rmtree(work / "chunk-cache", ignore_errors=True)
        follow += ["--chunk-cache", str(work / "chunk-cache")]
    reg_port = free_port()
    registry = subprocess.Popen(
        [BIN / "drafter-registry", "--package-path", str(package),
         "--laddr", f"127.0.0.1:{reg_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert registry.stdout is not None
    registry.stdout.readline()
    procs: list[subprocess.Popen[str]] = []

    def peer(raddr: str, ns: str, laddr: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [BIN / "drafter-peer", "--netns", ns, "--raddr", raddr, "--laddr", laddr,
             "--work-dir", str(work / "vms"), *follow],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        procs.append(proc)
        return proc

    runs: list[dict[str, float]] = []
    writer = Writer([stable] if stable else [n.external_address for n in nets])
    try:
        port = free_port()
        source = peer(f"127.0.0.1:{reg_port}", nets[0].namespace, f"127.0.0.1:{port}")
        assert source.stdout is not None
        source.stdout.readline()
        first_reply(stable or nets[0].external_address)
        writer.start()
        time.sleep(2)
        for hop in range(1, migrations + 1):
            next_port = free_port()
            with link(port, rtt_ms) as via:
                start = time.monotonic()
                ns = nets[hop % 2].namespace
                dest = peer(f"127.0.0.1:{via}", ns, f"127.0.0.1:{next_port}")
                source.communicate(timeout=600)  # exits once the destination holds everything
                end = time.monotonic()
                assert dest.stdout is not None
                summary = ""
                for line in iter(dest.stdout.readline, ""):
                    if line.startswith("migrated from"):
                        summary = line
                        break
            downtime = re.search(r"downtime (\d+) ms", summary)
            moved_part = summary.split(" moved ", 1)[-1].split(";")[0]  # logical, not wire
            moved = sum(float(m) for m in re.findall(r"([0-9.]+) MiB", moved_part))
            each = {f"moved_{name}_MiB": float(m)
                    for name, m in re.findall(r"(\w+) ([0-9.]+) MiB", moved_part)}  # fmt: skip
            for key, pattern in (
                ("wire_MiB", r"([0-9.]+) MiB on the wire"),
                ("from_host_cache_MiB", r"([0-9.]+) MiB from the host's"),
            ):
                found = re.search(pattern, summary)
                each[key] = float(found.group(1)) if found else 0.0  # fmt: skip
            total = re.search(r"total ([0-9.]+)s", summary)
            time.sleep(1.5)  # steady state before the next hop; the gap window ends here
            runs.append({
                "vmm_downtime_s": int(downtime.group(1)) / 1000 if downtime else float("nan"),
                "client_downtime_s": writer.longest_gap(start, time.monotonic()),
                "total_s": float(total.group(1)) if total else end - start,
                "moved_MiB": moved,
                **each,
                **phases(summary),
            })  # fmt: skip
            source, port = dest, next_port
    finally:
        writer.stop.set()
        writer.join(10)
        for proc in procs + [registry]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return summarize(runs)


# -- QEMU's own --------------------------------------------------------------------


def stamp(event: Any) -> float:
    return float(event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6)


class RunningQemu(QemuMachine):
    """A QEMU that starts running as soon as an incoming migration lets it (no -S)."""

    def command(self, incoming: bool = False) -> list[str]:
        return [arg for arg in super().command(incoming) if arg != "-S"]


async def qemu_builtin(work: Path, bp: Path, nets: list[Any], migrations: int,
                       postcopy: bool, rtt_ms: float) -> dict[str, Any]:  # fmt: skip
    shm = Path(tempfile.mkdtemp(prefix="drafter-bench-", dir="/dev/shm"))
    disk = work / "qemu-disk"
    subprocess.run(["cp", "--sparse=always", str(bp / "drafter.drftdisk"), str(disk)], check=True)

    def machine(index: int, netns: str) -> QemuMachine:
        config = MachineConfig(
            kernel=bp / "drafter.drftkernel", initramfs=bp / "drafter.drftinitramfs", disk=disk,
            memory=shm / f"memory-{index}", memory_mib=MEMORY_MIB, netns=netns,
        )  # fmt: skip
        return RunningQemu(config, work / f"qemu-run-{index}")

    caps = [{"capability": "postcopy-ram", "state": postcopy}]
    runs: list[dict[str, float]] = []
    source = machine(0, nets[0].namespace)
    stopping = [source]
    writer = Writer([n.external_address for n in nets])
    try:
        await snapshot.boot_to_liveness(source, 300)
        first_reply(nets[0].external_address)
        writer.start()
        await asyncio.sleep(2)
        for hop in range(1, migrations + 1):
            dest = machine(hop, nets[hop % 2].namespace)
            stopping.append(dest)  # stopped at the end whatever happens
            sock = work / f"migrate-{hop}.sock"
            await dest._start(incoming=True)
            await dest._execute("migrate-set-capabilities", {"capabilities": caps})
            await source._execute("migrate-set-capabilities", {"capabilities": caps})
            # Over TCP, the QEMUs are in their namespaces: the destination listens on
            # its namespace's veth, the link on the host side of the source's veth.
            port = free_port()
            to, src = nets[hop % 2], nets[(hop - 1) % 2]
            incoming = f"tcp:{to.namespace_address}:{port}" if rtt_ms > 0 else f"unix:{sock}"
            await dest._execute("migrate-incoming", {"uri": incoming})
            stopped, resumed = EventListener("STOP"), EventListener("RESUME")
            assert source.qmp is not None and dest.qmp is not None
            source.qmp.register_listener(stopped)
            dest.qmp.register_listener(resumed)
            with link(port, rtt_ms, to.namespace_address, src.host_address) as via:
                start = time.monotonic()
                uri = f"tcp:{src.host_address}:{via}" if rtt_ms > 0 else f"unix:{sock}"
                await source._execute("migrate", {"uri": uri})
                if postcopy:
                    await asyncio.sleep(0.2)
                    await source._execute("migrate-start-postcopy")
                while True:
                    info: Any = await source._execute("query-migrate")
                    if info.get("status") in ("completed", "failed", "cancelled"):
                        break
                    await asyncio.sleep(0.01)
                end = time.monotonic()
            if info.get("status") != "completed":
                detail = info.get("error-desc", "")
                raise RuntimeError(f"QEMU migration {info.get('status')}: {detail}")
            # Pause to resume, from the two QEMUs' own event timestamps.
            stop_event = await asyncio.wait_for(stopped.get(), 10)
            resume_event = await asyncio.wait_for(resumed.get(), 10)
            source.qmp.remove_listener(stopped)
            dest.qmp.remove_listener(resumed)
            await source.stop()
            Path(source.config.memory).unlink(missing_ok=True)
            await asyncio.sleep(1.5)
            ram = info.get("ram", {})
            runs.append({
                "vmm_downtime_s": stamp(resume_event) - stamp(stop_event),
                "client_downtime_s": writer.longest_gap(start, time.monotonic()),
                "total_s": end - start,
                "moved_MiB": ram.get("transferred", 0) / (1 << 20),
            })  # fmt: skip
            source = dest
    finally:
        writer.stop.set()
        writer.join(10)
        for qemu in stopping:
            await qemu.stop()
        subprocess.run(["rm", "-rf", str(shm)], check=False)
    return summarize(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--migrations", type=int, default=10)
    p.add_argument("--blueprint", default="out/blueprint")
    p.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0],
                   help="round-trip times to run at (0: direct)")  # fmt: skip
    p.add_argument("--only-ours", action="store_true", help="skip QEMU's own migrations")
    p.add_argument("--only-qemu", action="store_true", help="skip our migrations")
    p.add_argument("--chunk-cache", action="store_true",
                   help="also run ours with every peer sharing a host chunk cache")  # fmt: skip
    p.add_argument("--stable-address", default="10.246.200.1",
                   help="also run ours with this stable address, the writer using only it "
                   "('' = don't)")  # fmt: skip
    args = p.parse_args()
    bp = Path(args.blueprint)
    Path("out").mkdir(exist_ok=True)
    results: dict[str, Any] = {"memory_mib": MEMORY_MIB}
    with tempfile.TemporaryDirectory(prefix="drafter-bench-", dir="out") as tmp:
        work = Path(tmp)
        config = NetworkConfig(
            namespace_prefix="dbmig", namespace_count=2, host_veth_cidr="10.246.0.0/24",
            namespace_veth_cidr="10.247.0.0/24", state_dir=str(work / "net"),
        )  # fmt: skip
        with Network(config) as net:
            nets = net.namespaces
            for rtt in args.rtt_ms:
                at = results.setdefault(f"rtt_{rtt:g}ms", {})
                modes = [("drafter", None, False),
                         ("drafter_stable_address", args.stable_address, False),
                         ("drafter_chunk_cache", None, True)]  # fmt: skip
                for name, stable, cache in modes:
                    if args.only_qemu or (name == "drafter_stable_address" and not stable):
                        continue
                    if cache and not args.chunk_cache:
                        continue
                    try:
                        at[name] = ours(work, bp, nets, args.migrations, rtt, stable, cache)
                    except Exception as e:  # recorded; the other runs still count
                        at[name] = {"error": str(e)}
                if args.only_ours:
                    continue
                for name, postcopy in (("qemu_precopy", False), ("qemu_postcopy", True)):
                    try:
                        at[name] = asyncio.run(
                            qemu_builtin(work, bp, nets, args.migrations, postcopy, rtt)
                        )
                    except Exception as e:  # recorded; the other runs still count
                        at[name] = {"error": f"{type(e).__name__}: {e}"}
                print(json.dumps(results), file=sys.stderr, flush=True)  # so far
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
