"""What the pack costs a package's writer: write_package with and without it, A/B.

The resources of an existing package (``--package``, e.g. the 512 MiB Redis one that
bench/objectstore.py builds) are written again into a new package, alternately with
and without the pack, ``--repeat`` times each, from the page cache (one warm-up write
first). This is the work a runner's Ctrl-C flush or a packager does after the VM has
stopped. No root, no VM. Prints JSON: seconds per write (median and all), the sizes,
and the pack's share of the non-zero chunk bytes.

``.venv/bin/python bench/packwrite.py --package out/objectstore/redis-512-*.drft``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from common import emit  # noqa: E402
from drafter.chunks import RESOURCES, ZERO_HASH  # noqa: E402
from drafter.package import Source, open_package, write_package  # noqa: E402


def write_once(package: Path, target: Path, pack: bool) -> tuple[float, dict[str, Any]]:
    pkg = open_package(package)
    sources: dict[str, Source | Path] = {r: pkg.range(r) for r in RESOURCES[1:]}
    start = time.monotonic()
    index = write_package(target, pkg.config, sources, pkg.hot or None, pack=pack)
    took = time.monotonic() - start
    nonzero = sum(
        min(index.chunk_size, index.members[r].size - i * index.chunk_size)
        for r in RESOURCES[1:]
        for i, h in enumerate(index.hashes[r])
        if h != ZERO_HASH
    )
    pack_bytes = index.members["pack"].size if index.has_pack else 0
    sizes = {"package_bytes": target.stat().st_size, "nonzero_chunk_bytes": nonzero,
             "pack_bytes": pack_bytes}  # fmt: skip
    target.unlink()
    return took, sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--package", type=Path, required=True, help="package whose resources to write")
    p.add_argument("--repeat", type=int, default=3, help="writes per variant")
    p.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args()
    results: dict[str, Any] = {"package": str(a.package), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="drafter-bench-packwrite-", dir="out") as tmp:
        target = Path(tmp) / "p.drft"
        write_once(a.package, target, False)  # the page cache warm
        times: dict[str, list[float]] = {"without_pack": [], "with_pack": []}
        sizes: dict[str, dict[str, Any]] = {}
        for _ in range(a.repeat):
            for name, pack in (("without_pack", False), ("with_pack", True)):
                took, sizes[name] = write_once(a.package, target, pack)
                times[name].append(round(took, 3))
                print(f"{name}: {took:.2f} s", file=sys.stderr, flush=True)
    for name, values in times.items():
        results[name] = {"median_s": statistics.median(values), "samples_s": values, **sizes[name]}
    w = sizes["with_pack"]
    results["pack_share_of_nonzero_chunks"] = round(w["pack_bytes"] / w["nonzero_chunk_bytes"], 3)
    results["with_over_without"] = round(
        results["with_pack"]["median_s"] / results["without_pack"]["median_s"], 2
    )
    emit(results, a.output)


if __name__ == "__main__":
    main()
