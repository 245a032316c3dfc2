"""The chunk sources alone, without a VM: where a lazy start's time goes per source.

One package, served three ways on loopback (optionally behind ``bench/link.py`` at
``--rtt`` ms): ``drafter-registry``, SeaweedFS's S3 gateway and nginx (the servers the
tests use). For each, the peer's own fetch pattern through the source's API:

1. ``connect``: the handshake (registry) or HEAD + index + config (object store);
2. ``first``: what the resume waits for, the state, kernel and initramfs, at demand
   priority, beside the hot chunks at prefetch priority; the time until the demand
   set is local, then the hot set. Side by side (A/B): one request per chunk
   (``per_chunk``, as the peer asked before) and runs of consecutive chunks
   (``runs``, at most ``FIRST_RUN``, as ``Device.ensure_runs`` asks now);
3. ``rest``: every other chunk in runs of ``PULL_RUN`` at background priority, as the
   peer's pull pool asks.

Figures: seconds per phase, MiB and requests (object stores) per phase, MiB/s of the
rest. Run as root or not: ``.venv/bin/python bench/sources.py --package FILE
[--rtt MS] [--sources registry,s3,http] [--output FILE]``; JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the servers the tests run

from common import BIN, emit, free_port  # noqa: E402
from drafter.chunks import ZERO_HASH, Priority  # noqa: E402
from drafter.objects.source import ObjectSource  # noqa: E402
from drafter.peer.peer import FIRST_RUN  # noqa: E402
from drafter.peer.pull import PULL_RUN  # noqa: E402
from drafter.transport.client import RemoteSource  # noqa: E402
from support.objectstores import Nginx, SeaweedS3  # noqa: E402
from wan import LinkProc, Proc  # noqa: E402

BUCKET = "bench"
SOURCES = ("registry", "s3", "http")
FIRST = ("state", "kernel", "initramfs")


def runs_of(indices: list[int], max_run: int) -> list[tuple[int, int]]:
    """``indices`` as (start, count) runs of consecutive chunks, in their order."""
    out: list[tuple[int, int]] = []
    for index in indices:
        if out and index == sum(out[-1]) and out[-1][1] < max_run:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((index, 1))
    return out


async def measure(source: Any, max_run: int) -> dict[str, Any]:
    """The peer's fetch pattern through ``source``, the first chunks in runs of at most
    ``max_run`` (1: one request per chunk, as before FIRST_RUN): seconds, MiB and
    requests per phase."""
    got = {"bytes": 0}

    def deliver(_index: int, data: Any, _digest: bytes) -> None:
        got["bytes"] += len(data)

    def requests() -> int:
        return int(getattr(source, "requests", 0))

    out: dict[str, Any] = {}
    began = time.monotonic()
    await source.connect()
    out["connect_s"] = round(time.monotonic() - began, 3)
    local: dict[str, set[int]] = {name: set() for name in source.hashes}

    def fetch(name: str, indices: list[int], priority: Priority) -> list[Any]:
        local[name].update(indices)
        return [
            source.fetch_run(name, start, count, priority, [None] * count, deliver)
            for start, count in runs_of(indices, max_run)
        ]

    began, before = time.monotonic(), requests()
    demand = [
        fetch_
        for name in FIRST
        for fetch_ in fetch(name, list(range(len(source.hashes[name]))), Priority.DEMAND)
    ]
    hot = [
        fetch_
        for name, chunks in source.hot.items()
        for fetch_ in fetch(name, [i for i in chunks if i not in local[name]], Priority.PREFETCH)
    ]
    demand_task = asyncio.ensure_future(asyncio.gather(*demand))
    hot_task = asyncio.ensure_future(asyncio.gather(*hot))
    await demand_task
    out["first_demand_s"] = round(time.monotonic() - began, 3)
    out["first_demand_MiB"] = round(got["bytes"] / 2**20, 1)
    await hot_task
    out["first_hot_s"] = round(time.monotonic() - began, 3)
    out["first_MiB"] = round(got["bytes"] / 2**20, 1)
    out["first_chunks"] = sum(len(v) for v in local.values())
    out["first_requests"] = requests() - before
    # The rest, as the pull pool asks for it.
    runs = []
    for name, hashes in source.hashes.items():
        index = 0
        while index < len(hashes):
            if index in local[name] or hashes[index] == ZERO_HASH:
                index += 1
                continue
            end = index
            while (
                end < len(hashes)
                and end - index < PULL_RUN
                and end not in local[name]
                and hashes[end] != ZERO_HASH
            ):
                end += 1
            runs.append((name, index, end - index))
            index = end
    began, before, at = time.monotonic(), requests(), got["bytes"]
    await asyncio.gather(*[
        source.fetch_run(name, start, count, Priority.BACKGROUND, [None] * count, deliver)
        for name, start, count in runs
    ])  # fmt: skip
    seconds = time.monotonic() - began
    out["rest_s"] = round(seconds, 3)
    out["rest_MiB"] = round((got["bytes"] - at) / 2**20, 1)
    out["rest_MiB_per_s"] = round((got["bytes"] - at) / 2**20 / seconds, 1) if seconds else None
    out["rest_requests"] = requests() - before
    await source.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--package", type=Path, required=True, help="a package with an index")
    p.add_argument("--rtt", type=float, default=0, help="round-trip time (ms) through a link")
    p.add_argument("--rate-mbit", type=float, default=1000, help="the link's rate")
    p.add_argument("--sources", default=",".join(SOURCES), help="which of registry,s3,http")
    p.add_argument("--rounds", type=int, default=2, help="measurements per source")
    p.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    sources = [s for s in args.sources.split(",") if s]
    if not set(sources) <= set(SOURCES) or not args.package.is_file():
        p.error("give an existing --package and --sources from registry,s3,http")
    package = args.package.resolve()
    work = Path(tempfile.mkdtemp(prefix="drafter-bench-sources-")).resolve()
    results: dict[str, Any] = {
        "package": {"path": str(package), "bytes": package.stat().st_size},
        "rtt_ms": args.rtt,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    procs: list[Proc] = []
    seaweed: SeaweedS3 | None = None
    nginx: Nginx | None = None
    saved = dict(os.environ)
    try:
        targets: dict[str, int] = {}
        if "registry" in sources:
            port = free_port()
            registry = Proc("drafter-registry", [
                str(BIN / "drafter-registry"), "--package-path", str(package),
                "--laddr", f"127.0.0.1:{port}", "--insecure",
            ])  # fmt: skip
            procs.append(registry)
            registry.wait_for(re.compile(r"^serving "), time.monotonic() + 120)
            targets["registry"] = port
        if "s3" in sources:
            import obstore

            seaweed = SeaweedS3(work / "seaweed").start()
            seaweed.create_bucket(BUCKET)
            with package.open("rb") as f:
                obstore.put(seaweed.store(BUCKET), package.name, f, chunk_size=16 << 20)
            targets["s3"] = seaweed.port
        if "http" in sources:
            nginx = Nginx(package.parent, work / "nginx").start()
            targets["http"] = nginx.port

        def make(name: str, port: int) -> Any:
            if name == "registry":
                return RemoteSource(f"127.0.0.1:{port}")
            if name == "s3":
                assert seaweed is not None
                os.environ.update(seaweed.env())
                os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
                return ObjectSource(f"s3://{BUCKET}/{package.name}")
            return ObjectSource(f"http://127.0.0.1:{port}/{package.name}")

        for name in sources:
            port = targets[name]
            if args.rtt > 0:
                link = LinkProc(f"{name} link", port, args.rtt, args.rate_mbit)
                procs.append(link)
                port = link.port
            rounds = []
            for _ in range(args.rounds):
                for label, max_run in (("per_chunk", 1), ("runs", FIRST_RUN)):
                    source = make(name, port)
                    figures = {"first": label, **asyncio.run(measure(source, max_run))}
                    rounds.append(figures)
                    print(f"{name}: {json.dumps(figures)}", file=sys.stderr, flush=True)
            results[name] = rounds
        results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for server in (nginx, seaweed):
            if server is not None:
                server.stop()
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)
    emit(results, args.output)


if __name__ == "__main__":
    main()
