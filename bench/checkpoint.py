"""Continuous checkpoints to S3 under a write load, and recovery after a host loss.

For each round-trip time to the store (``--rtts``, ms; ``bench/link.py`` in front of
SeaweedFS's S3 gateway, ``--rate-mbit`` per direction), with a 512 MiB Redis VM:

1. ``drafter-peer --checkpoint s3://...`` starts it from a local ``drafter-registry``
   (not through the link) and checkpoints every ``--interval`` seconds while a client
   writes 4 KiB values to random keys as fast as it is answered. From the peer's log
   of each commit: the pause, the bytes uploaded, the seconds the checkpoint took;
   the first one (everything not zero) gives the upload throughput.
2. The writes stop; two checkpoints asked at once (SIGUSR2): an idle VM's cost.
3. The peer is killed (SIGKILL, its QEMU with it); a second ``drafter-peer --raddr
   s3://...`` in another namespace resumes the latest generation once the lease
   (``--lease-time``) lapsed: the time from the kill to its first Redis reply.

The store is the one the tests use (tests/support/objectstores.py: telemetry off,
loopback only, signed requests). Run as root: ``.venv/bin/python bench/checkpoint.py
[--rtts 0,100] [--output bench/results/checkpoint.json]``; JSON on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the servers the tests run

from common import BIN, emit, free_port  # noqa: E402
from support.objectstores import SeaweedS3  # noqa: E402
from wan import (  # noqa: E402
    MEMORY_MIB,
    LinkProc,
    Proc,
    StepFailed,
    StepTimeout,
    ensure_package,
    failure,
    key,
    start_daemon,
    terminate_on_sigterm,
    unmount_under,
    wait_reply,
)

BUCKET = "bench"
COMMITTED = re.compile(
    r"checkpoint (\d+) committed \(the VM as at ([\d.]+)\): ([\d.]+) MiB uploaded, "
    r"paused (\d+) ms, ([\d.]+) s in all"
)
RESUMING = re.compile(r"resuming checkpoint generation (\d+) .* committed ([\d.]+) s ago")


class Load(threading.Thread):
    """SET of 4 KiB values to random keys, as fast as answered, until stopped."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis(host=address, socket_timeout=5)
        self.stop = threading.Event()
        self.acked = 0
        self.errors = 0

    def run(self) -> None:
        rng = random.Random(1)
        value = os.urandom(4096)
        while not self.stop.is_set():
            try:
                self.client.set(f"k{rng.randrange(50000)}", value)
                self.acked += 1
            except redis.RedisError:
                self.errors += 1
                time.sleep(0.1)


def commits(proc: Proc, after: int = 0) -> list[dict[str, float]]:
    out = []
    for _, line in proc.lines[after:]:
        m = COMMITTED.search(line)
        if m:
            out.append({"generation": int(m[1]), "paused_at": float(m[2]),
                        "uploaded_MiB": float(m[3]), "pause_ms": float(m[4]),
                        "seconds": float(m[5])})  # fmt: skip
    return out


def wait_commits(proc: Proc, count: int, deadline: float) -> list[dict[str, float]]:
    while True:
        found = commits(proc)
        if len(found) >= count:
            return found
        if not proc.alive():
            raise StepFailed(f"{proc.name} exited:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise StepTimeout(f"{proc.name}: only {len(found)} checkpoint(s) committed")
        time.sleep(0.2)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_rtt(
    args: argparse.Namespace, work: Path, rtt: float, seaweed: SeaweedS3, raddr: str,
    namespaces: list[tuple[str, str]],
) -> dict[str, Any]:  # fmt: skip
    """Checkpoints under load, idle, and a recovery, with the store ``rtt`` ms away."""
    result: dict[str, Any] = {}
    link = LinkProc(f"S3 link {key(rtt)} ms", seaweed.port, rtt, args.rate_mbit)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(seaweed.env(), AWS_ENDPOINT_URL=f"http://127.0.0.1:{link.port}")
    prefix = f"s3://{BUCKET}/checkpoints-{key(rtt)}ms-{os.getpid()}"
    flags = ["--lease-time", str(args.lease_time), "--work-dir", str(work / "vms")]
    (ns0, address0), (ns1, address1) = namespaces
    procs: list[Proc] = [link]
    start = time.monotonic()
    deadline = start + args.timeout
    try:
        peer = Proc("drafter-peer --checkpoint", [
            str(args.bin / "drafter-peer"), "--netns", ns0, "--raddr", raddr, "--laddr", "",
            "--checkpoint", prefix, "--checkpoint-interval", str(args.interval), *flags,
        ], env=env)  # fmt: skip
        procs.append(peer)
        wait_reply(address0, peer, deadline)
        load = Load(address0)
        load.start()
        loaded = time.monotonic()
        found = wait_commits(peer, args.checkpoints + 1, deadline)
        load.stop.set()
        load.join(10)
        writes = load.acked / max(1e-9, time.monotonic() - loaded)
        first, under_load = found[0], found[1:]
        result["first_checkpoint"] = {
            "uploaded_MiB": first["uploaded_MiB"], "seconds": first["seconds"],
            "MiB_per_s": round(first["uploaded_MiB"] / max(first["seconds"], 1e-9), 1),
            "pause_ms": first["pause_ms"],
        }  # fmt: skip
        pauses = [c["pause_ms"] for c in under_load]
        uploaded = [c["uploaded_MiB"] for c in under_load]
        result["under_load"] = {
            "checkpoints": len(under_load),
            "writes_per_s": round(writes, 1),
            "write_bytes_per_s_MiB": round(writes * 4096 / (1 << 20), 2),
            "pause_ms_p50": percentile(pauses, 0.5),
            "pause_ms_p95": percentile(pauses, 0.95),
            "uploaded_MiB_p50": percentile(uploaded, 0.5),
            "seconds_p50": percentile([c["seconds"] for c in under_load], 0.5),
        }
        time.sleep(2)
        count = len(commits(peer))
        for n in (1, 2):
            peer.popen.send_signal(signal.SIGUSR2)
            found = wait_commits(peer, count + n, deadline)
        idle = found[-1]
        result["idle_checkpoint"] = {
            "uploaded_MiB": idle["uploaded_MiB"], "pause_ms": idle["pause_ms"],
            "share_of_memory": round(idle["uploaded_MiB"] / MEMORY_MIB, 4),
        }  # fmt: skip
        peer.popen.kill()  # the host is gone: the peer, and its QEMU with it
        killed = time.monotonic()
        peer.popen.wait(30)
        recoverer = Proc("drafter-peer --raddr s3://", [
            str(args.bin / "drafter-peer"), "--netns", ns1, "--raddr", prefix, "--laddr", "",
            *flags,
        ], env=env)  # fmt: skip
        procs.append(recoverer)
        wait_reply(address1, recoverer, time.monotonic() + args.timeout)
        recovered = time.monotonic() - killed
        _, match, _ = recoverer.wait_for(RESUMING, time.monotonic() + 5)
        result["recovery"] = {
            "kill_to_first_reply_s": round(recovered, 2),
            "of_which_lease_wait_s": args.lease_time,
            "generation": int(match[1]),
            "generation_age_at_start_s": float(match[2]),
        }
    except (StepTimeout, StepFailed) as e:
        result.update(failure(e, time.monotonic() - start))
    finally:
        for proc in reversed(procs):
            proc.stop()
        unmount_under(work / "vms")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rtts", default="0,100", help="round-trip times to the store in ms")
    p.add_argument("--rate-mbit", type=float, default=1000, help="rate cap per direction")
    p.add_argument("--interval", type=float, default=5, help="--checkpoint-interval")
    p.add_argument("--checkpoints", type=int, default=8, help="checkpoints under load")
    p.add_argument("--lease-time", type=float, default=10, help="--lease-time")
    p.add_argument("--bin", type=Path, default=BIN, help="where the drafter-* commands are")
    p.add_argument("--blueprint", type=Path, default=Path("out/test/blueprint-redis"),
                   help="blueprint to package (built if missing)")  # fmt: skip
    p.add_argument("--package", type=Path, default=None, help="512 MiB Redis package")
    p.add_argument("--timeout", type=float, default=600, help="seconds per RTT")
    p.add_argument("--namespace-prefix", default="ckp")
    p.add_argument("--cidr-base", type=int, default=242,
                   help="host veths in 10.N.0.0/24, namespaces in 10.N+1.0.0/24")  # fmt: skip
    p.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    args.bin = args.bin.resolve()
    rtts = [float(x) for x in args.rtts.split(",") if x.strip()]
    tag = hashlib.sha1(str(args.bin).encode()).hexdigest()[:8]
    package = (args.package or Path(f"out/objectstore/redis-{MEMORY_MIB}-{tag}.drft")).resolve()
    Path("out").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="drafter-bench-checkpoint-", dir="out")).resolve()
    results: dict[str, Any] = {
        "bin": str(args.bin),
        "rate_mbit": args.rate_mbit,
        "interval_s": args.interval,
        "memory_mib": MEMORY_MIB,
        "link": "bench/link.py between the peers and the store only",
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    daemon: Proc | None = None
    registry: Proc | None = None
    seaweed: SeaweedS3 | None = None
    try:
        with terminate_on_sigterm():
            base = args.cidr_base
            daemon, addresses = start_daemon(
                args.bin, work / "net", args.namespace_prefix,
                f"10.{base}.0.0/24", f"10.{base + 1}.0.0/24",
            )  # fmt: skip
            namespaces = sorted(addresses.items())
            ensure_package(args.bin, args.blueprint.resolve(), package, namespaces[0][0])
            port = free_port()
            registry = Proc("drafter-registry", [
                str(args.bin / "drafter-registry"), "--package-path", str(package),
                "--laddr", f"127.0.0.1:{port}",
            ])  # fmt: skip
            registry.wait_for(re.compile(r"^serving "), time.monotonic() + 120)
            seaweed = SeaweedS3(work / "seaweed")
            seaweed.start()
            seaweed.create_bucket(BUCKET)
            for rtt in rtts:
                results[key(rtt)] = one_rtt(
                    args, work, rtt, seaweed, f"127.0.0.1:{port}", namespaces
                )
                print(f"RTT {key(rtt)} ms: {json.dumps(results[key(rtt)])}",
                      file=sys.stderr, flush=True)  # fmt: skip
            results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if seaweed is not None:
            seaweed.stop()
        for proc in (registry, daemon):
            if proc is not None:
                proc.stop()
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
    emit(results, args.output)


if __name__ == "__main__":
    main()
