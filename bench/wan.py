"""Lazy start and live migration over an emulated long link, beside a plain TCP copy.

For each round-trip time (``--rtts``, ms) at ``--rate-mbit`` per direction, with
``bench/link.py`` (a separate process) in front of each server:

1. lazy start: ``drafter-peer`` from ``drafter-registry`` through link 1: time to the
   first Redis reply, time until the peer logs ``all N MiB local after X s``, bytes
   on the wire (link 1's counters when the peer is all local);
2. migration: a second ``drafter-peer`` in another namespace migrates the VM from the
   first one through link 2: the destination's summary (total, downtime, rounds,
   MiB moved), when the source exited, when the destination was all local, bytes
   through link 2;
3. baseline: a plain TCP copy of the package's data (its non-hole bytes, sendfile to
   a receiver reading into a buffer) through a link with the same settings.

Also, once: the link's own cost (the same copy direct, and through the link at 0 ms
without a rate cap). A step that takes longer than ``--timeout`` is reported as timed
out and the next steps that need it are skipped.

Commands come from ``--bin`` (default: this venv's), so the same script measures an
older build: ``.venv/bin/python bench/wan.py --bin /work/before/.venv/bin``. This
script imports nothing from ``drafter``.

Run as root: .venv/bin/python bench/wan.py [--rtts 0,20,100] [--rate-mbit 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import redis

from common import BIN, emit, first_reply, free_port, make_package

MIB = 1 << 20
LINK = Path(__file__).resolve().parent / "link.py"
MEMORY_MIB = 512

ALL_LOCAL = re.compile(r"all (\d+) MiB local after ([0-9.]+) ?s")
MIGRATED = re.compile(r"migrated from (\S+): total ([0-9.]+) ?s")
DOWNTIME = re.compile(r"downtime (\d+) ms")
ROUNDS = re.compile(r"(\d+) pre-copy round")
MOVED = re.compile(r"([0-9.]+) MiB")
RESUMED = re.compile(r"resumed the VM from \S+ in (\d+) ms")
REACHABLE = re.compile(r"^(\S+): VM reachable from the host at (\S+)")
LISTENING = re.compile(r"^listening on \S+:(\d+)")


P = TypeVar("P", bound="Proc")


class StepTimeout(Exception):
    """A step took longer than --timeout."""


class StepFailed(Exception):
    """A process a step needs exited, or answered something unexpected."""


# -- processes -----------------------------------------------------------------------


class Proc:
    """A child process; threads collect its stdout and stderr lines with their times."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env
        )
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.open_streams = 2
        for stream in (self.popen.stdout, self.popen.stderr):
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            with self.cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.cond.notify_all()
        with self.cond:
            self.open_streams -= 1
            self.cond.notify_all()

    def wait_for(
        self, pattern: re.Pattern[str], deadline: float, after: int = 0
    ) -> tuple[float, re.Match[str], int]:
        """The first line from index ``after`` matching ``pattern``: (time seen, match, index)."""
        with self.cond:
            index = after
            while True:
                while index < len(self.lines):
                    seen, line = self.lines[index]
                    match = pattern.search(line)
                    if match:
                        return seen, match, index
                    index += 1
                if self.open_streams == 0:
                    raise StepFailed(f"{self.name} exited ({self.popen.wait()}):\n{self.tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StepTimeout(f"{self.name}: no line matching {pattern.pattern!r}")
                self.cond.wait(min(remaining, 1.0))

    def tail(self, n: int = 8) -> str:
        with self.cond:
            return "\n".join(line for _, line in self.lines[-n:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 60) -> int:
        """SIGINT, then SIGKILL by PID if it lingers; wait for it."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


class LinkProc(Proc):
    """``bench/link.py`` in its own process."""

    def __init__(self, name: str, target_port: int, rtt_ms: float, rate_mbit: float) -> None:
        super().__init__(
            name,
            [sys.executable, str(LINK), "--target", f"127.0.0.1:{target_port}",
             "--rtt-ms", str(rtt_ms), "--rate-mbit", str(rate_mbit)],
        )  # fmt: skip
        _, match, self.ready_index = self.wait_for(LISTENING, time.monotonic() + 30)
        self.port = int(match.group(1))

    def counts(self, final: bool = False) -> dict[str, int]:
        """Its byte counters now (SIGUSR1), or after it stopped (``final``)."""
        before = len(self.lines)
        if final:
            self.stop()
        else:
            self.popen.send_signal(signal.SIGUSR1)
        _, match, _ = self.wait_for(re.compile(r"^\{.*\}$"), time.monotonic() + 10, before)
        data = json.loads(match.group(0))
        return {k: int(data[k]) for k in ("bytes_to_target", "bytes_to_client")}


def wire_bytes(counts: dict[str, int]) -> dict[str, int]:
    return {
        "to_server": counts["bytes_to_target"],
        "to_client": counts["bytes_to_client"],
        "total": counts["bytes_to_target"] + counts["bytes_to_client"],
    }


# -- setup ---------------------------------------------------------------------------


def start_daemon(
    bin_dir: Path, state_dir: Path, prefix: str, host_cidr: str, ns_cidr: str, count: int = 2
) -> tuple[Proc, dict[str, str]]:
    """drafter-daemon with ``count`` namespaces of our own; returns it and namespace → address."""
    daemon = Proc(
        "drafter-daemon",
        [str(bin_dir / "drafter-daemon"), "--namespace-prefix", prefix,
         "--namespace-count", str(count), "--host-veth-cidr", host_cidr,
         "--namespace-veth-cidr", ns_cidr, "--state-dir", str(state_dir)],
    )  # fmt: skip
    try:
        _, _, ready = daemon.wait_for(re.compile(r"^ready"), time.monotonic() + 60)
        addresses = {}
        for _, line in daemon.lines[:ready]:
            match = REACHABLE.search(line)
            if match:
                addresses[match.group(1)] = match.group(2)
        if len(addresses) != count:
            raise StepFailed(f"drafter-daemon printed no addresses:\n{daemon.tail()}")
    except BaseException:
        daemon.stop()
        raise
    return daemon, addresses


def ensure_package(bin_dir: Path, blueprint: Path, package: Path, ns: str) -> None:
    """Build the blueprint and the 512 MiB Redis package unless they exist."""
    if not (blueprint / "drafter.drftdisk").exists():
        subprocess.run(
            [bin_dir / "drafter-blueprint", "--output-dir", str(blueprint),
             "--cache-dir", str(blueprint.parent / "cache")],
            check=True, capture_output=True, timeout=1800,
        )  # fmt: skip
    if package.exists():
        return
    package.parent.mkdir(parents=True, exist_ok=True)
    partial = package.with_suffix(".partial.drft")
    make_package(blueprint, ns, MEMORY_MIB, partial, bin_dir, timeout=900)
    partial.rename(package)


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of every non-hole range of ``path``."""
    extents = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end - start))
            offset = end
    finally:
        os.close(fd)
    return extents


def unmount_under(directory: Path) -> None:
    """FUSE mounts a killed peer left below ``directory``."""
    prefix = str(directory.resolve()) + "/"
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted(points, key=len, reverse=True):
        if point.startswith(prefix):
            subprocess.run(["fusermount3", "-u", "-z", point], check=False, capture_output=True)
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


# -- measurements ------------------------------------------------------------------------


def wait_reply(address: str, proc: Proc, deadline: float) -> None:
    """common.first_reply, giving up when ``proc`` exits or at ``deadline``."""
    while True:
        try:
            first_reply(address, timeout=1)
            return
        except redis.RedisError:
            if not proc.alive():
                raise StepFailed(f"{proc.name} exited:\n{proc.tail()}") from None
            if time.monotonic() > deadline:
                raise StepTimeout(f"no Redis reply at {address}") from None


def tcp_copy(package: Path, extents: list[tuple[int, int]], via: Callable[[int], int],
             timeout: float) -> dict[str, Any]:  # fmt: skip
    """Send ``extents`` of ``package`` with sendfile to a receiver reading into a buffer.

    ``via(port)`` returns the port to connect to (a link's, or ``port`` itself).
    Timed from connect to the receiver holding every byte.
    """
    total = sum(length for _, length in extents)
    server = socket.create_server(("127.0.0.1", 0))
    got = [0]
    finished = [0.0]

    def receive() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(timeout)
            buf = bytearray(4 * MIB)
            with contextlib.suppress(OSError):
                while got[0] < total:
                    n = conn.recv_into(buf)
                    if not n:
                        break
                    got[0] += n
            finished[0] = time.monotonic()

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    try:
        port = via(server.getsockname()[1])
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as sock, package.open("rb") as f:
            sock.settimeout(timeout)
            try:
                for offset, length in extents:
                    sock.sendfile(f, offset, length)
            except OSError as e:
                raise StepTimeout(f"plain TCP copy: {e}") from None
            receiver.join(max(0.0, start + timeout - time.monotonic()))
        if receiver.is_alive() or got[0] != total:
            raise StepTimeout(f"plain TCP copy: {got[0]} of {total} bytes")
    finally:
        server.close()
    took = finished[0] - start
    return {"bytes": total, "s": round(took, 3), "MiB_per_s": round(total / took / MIB, 1)}


class Run:
    """One RTT: registry, link 1, source peer; then link 2 and the destination peer."""

    def __init__(self, args: argparse.Namespace, rtt: float, package: Path, work: Path,
                 namespaces: list[tuple[str, str]]) -> None:  # fmt: skip
        self.args = args
        self.rtt = rtt
        self.package = package
        self.work = work
        self.namespaces = namespaces
        self.procs: list[Proc] = []  # stopped in reverse order

    def start(self, proc: P) -> P:
        self.procs.append(proc)
        return proc

    def peer(self, name: str, ns: str, raddr_port: int, laddr_port: int) -> Proc:
        return self.start(Proc(name, [
            str(self.args.bin / "drafter-peer"), "--netns", ns,
            "--raddr", f"127.0.0.1:{raddr_port}", "--laddr", f"127.0.0.1:{laddr_port}",
            "--work-dir", str(self.work / "vms"), *self.args.peer_arg,
        ]))  # fmt: skip

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def measure(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            try:
                lazy, source = self.lazy_start()
            except (StepTimeout, StepFailed) as e:
                lazy, source = failure(e, None), None
            out["lazy_start"] = lazy
            if source is None:
                out["migration"] = {"skipped": "the lazy start did not finish"}
            else:
                out["migration"] = step(lambda: self.migration(source))
        finally:
            self.stop_all()
        return out

    def lazy_start(self) -> tuple[dict[str, Any], Proc | None]:
        a = self.args
        registry_port = free_port()
        registry = self.start(Proc("drafter-registry", [
            str(a.bin / "drafter-registry"), "--package-path", str(self.package),
            "--laddr", f"127.0.0.1:{registry_port}",
        ]))  # fmt: skip
        registry.wait_for(re.compile(r"^serving "), time.monotonic() + 30)
        link = self.start(LinkProc("link 1", registry_port, self.rtt, a.rate_mbit))
        ns, address = self.namespaces[0]
        self.source_port = free_port()
        result: dict[str, Any] = {}
        start = time.monotonic()
        deadline = start + a.timeout
        peer = self.peer("source drafter-peer", ns, link.port, self.source_port)
        try:
            wait_reply(address, peer, deadline)
            result["first_reply_s"] = round(time.monotonic() - start, 3)
            with contextlib.suppress(StepTimeout):
                _, match, _ = peer.wait_for(RESUMED, time.monotonic() + 5)
                result["resumed_ms"] = int(match.group(1))
            seen, match, _ = peer.wait_for(ALL_LOCAL, deadline)
            result["all_local_s"] = float(match.group(2))
            result["all_local_wall_s"] = round(seen - start, 3)
            result["all_local_MiB"] = int(match.group(1))
            result["wire_bytes"] = wire_bytes(link.counts())
        except (StepTimeout, StepFailed) as e:
            result.update(failure(e, time.monotonic() - start))
            with contextlib.suppress(StepTimeout, StepFailed):
                result["wire_bytes_so_far"] = wire_bytes(link.counts())
            return result, None
        return result, peer

    def migration(self, source: Proc) -> dict[str, Any]:
        a = self.args
        link = self.start(LinkProc("link 2", self.source_port, self.rtt, a.rate_mbit))
        ns, address = self.namespaces[1]
        result: dict[str, Any] = {}
        start = time.monotonic()
        deadline = start + a.timeout
        dest = self.peer("destination drafter-peer", ns, link.port, free_port())
        try:
            _, match, index = dest.wait_for(MIGRATED, deadline)
            line = dest.lines[index][1]
            result["total_s"] = float(match.group(2))
            downtime, rounds = DOWNTIME.search(line), ROUNDS.search(line)
            result["downtime_ms"] = int(downtime.group(1)) if downtime else None
            result["precopy_rounds"] = int(rounds.group(1)) if rounds else None
            moved, _, wire = line.split(" moved ", 1)[-1].partition(";")
            result["moved_MiB"] = round(sum(float(m) for m in MOVED.findall(moved)), 1)
            on_wire = re.search(r"([0-9.]+) MiB on the wire", wire)
            if on_wire:  # the peer's own count of chunk payload bytes (newer peers)
                result["chunk_payload_on_wire_MiB"] = float(on_wire.group(1))
            seen, match, _ = dest.wait_for(ALL_LOCAL, deadline)
            result["dest_all_local_s"] = float(match.group(2))
            result["dest_all_local_wall_s"] = round(seen - start, 3)
            try:
                source.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise StepTimeout("the source did not exit") from None
            result["source_exited_wall_s"] = round(time.monotonic() - start, 3)
            result["source_exit_code"] = source.popen.returncode
            wait_reply(address, dest, time.monotonic() + 30)
            result["destination_answers"] = True
            result["wire_bytes"] = wire_bytes(link.counts(final=True))
        except (StepTimeout, StepFailed) as e:
            result.update(failure(e, time.monotonic() - start))
            with contextlib.suppress(StepTimeout, StepFailed):
                result["wire_bytes_so_far"] = wire_bytes(link.counts(final=True))
        return result


def failure(e: Exception, after: float | None) -> dict[str, Any]:
    """A step's result when it timed out or a process it needed failed."""
    took = None if after is None else round(after, 1)
    if isinstance(e, StepTimeout):
        return {"timed_out": True, "after_s": took, "detail": str(e)}
    return {"failed": str(e)[-2000:], "after_s": took}


def step(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return body()
    except (StepTimeout, StepFailed) as e:
        return failure(e, None)


def ratios(results: dict[str, Any], rtts: list[float]) -> dict[str, Any]:
    """Each figure at RTT x over the same figure at the first RTT; and ours over a TCP copy."""
    paths = {
        "first_reply": ("lazy_start", "first_reply_s"),
        "all_local": ("lazy_start", "all_local_s"),
        "migration_total": ("migration", "total_s"),
        "migration_source_exited": ("migration", "source_exited_wall_s"),
        "tcp_copy": ("tcp_copy", "s"),
    }

    def get(rtt: float, path: tuple[str, str]) -> float | None:
        value = results.get(key(rtt), {}).get(path[0], {}).get(path[1])
        return float(value) if isinstance(value, int | float) else None

    out: dict[str, Any] = {}
    base = rtts[0]
    for rtt in rtts:
        r: dict[str, float | None] = {}
        for name, path in paths.items():
            x, b = get(rtt, path), get(base, path)
            if rtt != base:
                r[f"{name}_vs_{key(base)}ms"] = round(x / b, 2) if x and b else None
        local, copy = get(rtt, paths["all_local"]), get(rtt, paths["tcp_copy"])
        r["all_local_vs_tcp_copy"] = round(local / copy, 2) if local and copy else None
        out[key(rtt)] = r
    return out


def key(rtt: float) -> str:
    return f"{rtt:g}"


# -- main ----------------------------------------------------------------------------


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every finally block stops what it started."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rtts", default="0,20,100", help="round-trip times in ms, comma-separated")
    p.add_argument("--rate-mbit", type=float, default=1000, help="rate cap per direction")
    p.add_argument("--bin", type=Path, default=BIN, help="where the drafter-* commands are")
    p.add_argument("--blueprint", type=Path, default=Path("out/blueprint"),
                   help="blueprint to package (built if missing)")  # fmt: skip
    p.add_argument("--package", type=Path, default=None,
                   help="512 MiB Redis package to reuse or build (default: "
                   "out/wan/redis-512-<hash of --bin>.drft)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=240, help="seconds per step")
    p.add_argument("--namespace-prefix", default="wan")
    p.add_argument("--cidr-base", type=int, default=250,
                   help="host veths in 10.N.0.0/24, namespaces in 10.N+1.0.0/24")  # fmt: skip
    p.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--peer-arg", action="append", default=[],
                   help="one more drafter-peer argument (repeatable), "
                   "e.g. --peer-arg=--compress=none")  # fmt: skip
    args = p.parse_args()
    args.bin = args.bin.resolve()
    rtts = [float(x) for x in args.rtts.split(",") if x.strip()]
    if not rtts:
        p.error("--rtts is empty")
    tag = hashlib.sha1(str(args.bin).encode()).hexdigest()[:8]
    package = (args.package or Path(f"out/wan/redis-{MEMORY_MIB}-{tag}.drft")).resolve()
    Path("out").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="drafter-bench-wan-", dir="out")).resolve()
    results: dict[str, Any] = {
        "bin": str(args.bin),
        "rate_mbit": args.rate_mbit,
        "timeout_s": args.timeout,
        "link": "bench/link.py, one process per link, bottleneck queue 1 MiB + bandwidth-delay",
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    daemon: Proc | None = None
    try:
        with terminate_on_sigterm():
            base = args.cidr_base
            daemon, addresses = start_daemon(
                args.bin, work / "net", args.namespace_prefix,
                f"10.{base}.0.0/24", f"10.{base + 1}.0.0/24",
            )  # fmt: skip
            namespaces = sorted(addresses.items())
            ensure_package(args.bin, args.blueprint.resolve(), package, namespaces[0][0])
            subprocess.run(["cat", str(package)], stdout=subprocess.DEVNULL, check=True)
            extents = data_extents(package)
            results["package"] = {
                "path": str(package),
                "memory_mib": MEMORY_MIB,
                "bytes": package.stat().st_size,
                "data_bytes": sum(length for _, length in extents),
            }
            results["link_cost"] = link_cost(package, extents, args.timeout)
            for rtt in rtts:
                run = Run(args, rtt, package, work, namespaces)
                entry = run.measure()
                copy = functools.partial(
                    tcp_copy_via_link, package, extents, rtt, args.rate_mbit, args.timeout
                )
                entry["tcp_copy"] = step(copy)
                results[key(rtt)] = entry
                print(f"RTT {key(rtt)} ms: {json.dumps(entry)}", file=sys.stderr, flush=True)
            results["ratios"] = ratios(results, rtts)
            results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if daemon is not None:
            daemon.stop()
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
    emit(results, args.output)


def tcp_copy_via_link(package: Path, extents: list[tuple[int, int]], rtt: float,
                      rate_mbit: float, timeout: float) -> dict[str, Any]:  # fmt: skip
    links: list[LinkProc] = []

    def via(port: int) -> int:
        links.append(LinkProc("copy link", port, rtt, rate_mbit))
        return links[-1].port

    try:
        result = tcp_copy(package, extents, via, timeout)
        result["wire_bytes"] = wire_bytes(links[0].counts(final=True))
        return result
    finally:
        for link in links:
            link.stop()


def link_cost(package: Path, extents: list[tuple[int, int]], timeout: float) -> dict[str, Any]:
    """The same copy direct and through the link at 0 ms without a rate cap."""
    direct = tcp_copy(package, extents, lambda port: port, timeout)
    through = tcp_copy_via_link(package, extents, 0, 0, timeout)
    return {
        "bytes": direct["bytes"],
        "direct_MiB_per_s": direct["MiB_per_s"],
        "through_link_0ms_uncapped_MiB_per_s": through["MiB_per_s"],
    }


if __name__ == "__main__":
    main()
