"""Device reads through the FUSE mount beside the same bytes from the package file.

A runner resumes the 512 MiB Redis package (bench/objectstore.py builds it) and its
VM sits idle. Then, ``--runs`` times, with the page cache of both files dropped first
(``posix_fadvise(DONTNEED)``: the package file's pages, and those of the mounted
memory file that QEMU does not map), the same reads go to each:

- ``random_4k``: ``--reads`` reads of 4 KiB at random page offsets (the shape of a
  guest's page faults), one at a time;
- ``sequential_4m``: 4 MiB reads over ``--span-mib`` MiB.

For each: microseconds per read (random) or MiB/s (sequential) through the mount and
from the file, and the mount's rate over the file's (issue 21's targets: at least 0.5
for random, 0.8 for sequential). This is what a fault costs a VM after a resume, a
lazy start or a migration, once its chunk is local. Run as root:
``.venv/bin/python bench/devices.py [--package PKG] [--output FILE]``; JSON on stdout.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from common import BIN, emit  # noqa: E402
from drafter.package import open_package  # noqa: E402
from wan import Proc, start_daemon, terminate_on_sigterm, unmount_under  # noqa: E402

PAGE = 4096


def drop(path: Path) -> None:
    """The file's clean pages out of the page cache (mapped ones stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def random_reads(path: Path, base: int, offsets: list[int]) -> float:
    """Microseconds per 4 KiB read at ``base + offset``, one after the other."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for offset in offsets:
            if len(os.pread(fd, PAGE, base + offset)) != PAGE:
                raise RuntimeError(f"short read of {path}")
        return (time.perf_counter() - start) / len(offsets) * 1e6
    finally:
        os.close(fd)


def sequential_reads(path: Path, base: int, start: int, span: int) -> float:
    """MiB/s of 4 MiB reads over ``span`` bytes from ``base + start``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        began = time.perf_counter()
        for at in range(start, start + span, 4 << 20):
            os.pread(fd, 4 << 20, base + at)
        return span / (1 << 20) / (time.perf_counter() - began)
    finally:
        os.close(fd)


def mounted_memory(package: Path, pid: int, deadline: float) -> Path:
    """The runner's memory device file (its work directory beside the package)."""
    while time.monotonic() < deadline:
        for work in package.parent.glob(f".{package.name}.{pid}.*.work"):
            memory = work / "devices" / "memory"
            if memory.exists():
                return memory
        time.sleep(0.1)
    raise RuntimeError("the runner's devices did not appear")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--package", type=Path, default=None,
                   help="a 512 MiB package (default: bench/objectstore.py's)")  # fmt: skip
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--reads", type=int, default=2000, help="random 4 KiB reads per run")
    p.add_argument("--span-mib", type=int, default=128, help="sequential span per run")
    p.add_argument("--settle", type=float, default=5.0, help="seconds idle after the resume")
    p.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args()
    package = a.package or next(Path("out/objectstore").glob("redis-512-*.drft"), None)
    if package is None or not package.exists():
        p.error("no package: give --package (bench/objectstore.py builds one)")
    package = package.resolve()
    pkg = open_package(package)
    member = pkg.members["memory"]
    work = Path(tempfile.mkdtemp(prefix="drafter-bench-devices-", dir="out")).resolve()
    # A copy beside the work: the runner may write its snapshot back to it on exit.
    copy = work / "redis.drft"
    subprocess.run(["cp", "--sparse=always", str(package), str(copy)], check=True)
    results: dict[str, Any] = {"package": str(package), "runs": a.runs, "reads": a.reads,
                               "span_mib": a.span_mib}  # fmt: skip
    daemon = runner = None
    try:
        with terminate_on_sigterm():
            daemon, addresses = start_daemon(BIN, work / "net", "dev", "10.244.0.0/24",
                                             "10.245.0.0/24", count=1)  # fmt: skip
            ns = sorted(addresses)[0]
            runner = Proc("drafter-runner", [str(BIN / "drafter-runner"), "--netns", ns,
                          "--package-path", str(copy), "--persist=false"])  # fmt: skip
            mount = mounted_memory(copy, runner.popen.pid, time.monotonic() + 120)
            runner.wait_for(re.compile("resumed"), time.monotonic() + 120)
            time.sleep(a.settle)  # the VM idle
            rng = random.Random(21)
            pages = member.size // PAGE
            samples: dict[str, list[float]] = {k: [] for k in (
                "random_4k_mount_us", "random_4k_file_us",
                "sequential_4m_mount_mib_s", "sequential_4m_file_mib_s")}  # fmt: skip
            span = a.span_mib << 20
            for run in range(a.runs):
                offsets = [rng.randrange(pages) * PAGE for _ in range(a.reads)]
                start = rng.randrange((member.size - span) // (4 << 20)) * (4 << 20)
                for target, base, name in ((mount, 0, "mount"), (copy, member.offset, "file")):
                    drop(copy)
                    drop(mount)
                    samples[f"random_4k_{name}_us"].append(
                        round(random_reads(target, base, offsets), 1)
                    )
                    drop(copy)
                    drop(mount)
                    samples[f"sequential_4m_{name}_mib_s"].append(
                        round(sequential_reads(target, base, start, span), 1))  # fmt: skip
                print(f"run {run}: " + ", ".join(f"{k} {v[-1]}" for k, v in samples.items()),
                      file=sys.stderr, flush=True)  # fmt: skip
            for key, values in samples.items():
                results[key] = {"median": round(statistics.median(values), 1), "samples": values}
            m = results
            results["random_4k_rate_vs_file"] = round(
                m["random_4k_file_us"]["median"] / m["random_4k_mount_us"]["median"], 3
            )
            results["sequential_rate_vs_file"] = round(
                m["sequential_4m_mount_mib_s"]["median"] / m["sequential_4m_file_mib_s"]["median"],
                3)  # fmt: skip
            results["targets"] = {"random_at_least": 0.5, "sequential_at_least": 0.8}
    finally:
        if runner is not None:
            runner.stop()
        if daemon is not None:
            daemon.stop()
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
    emit(results, a.output)


if __name__ == "__main__":
    main()
