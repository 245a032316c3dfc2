"""drafter-runner start to first Redis reply, for 512 MiB and 2 GiB packages; flush time.

Each size is packaged once, then resumed ``--rounds`` times with ``drafter-runner``
(a real subprocess, as a user runs it); each round writes a key and Ctrl-C's the
runner, whose flush time is read from its output. Prints JSON.
Run as root: .venv/bin/python bench/runner.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from common import BIN, first_reply, make_package
from drafter.network import Network, NetworkConfig


def measure(package: Path, netns: str, address: str, rounds: int) -> dict[str, object]:
    starts, flushes = [], []
    for i in range(rounds):
        start = time.monotonic()
        proc = subprocess.Popen(
            [BIN / "drafter-runner", "--netns", netns, "--package-path", str(package)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            first_reply(address)
            starts.append(time.monotonic() - start)
            redis.Redis(host=address).set(f"round{i}", "x" * 1024)
        finally:
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=120)
        m = re.search(r"in ([0-9.]+)s", out.splitlines()[-1] if out else "")
        if m:
            flushes.append(float(m.group(1)))
    return {
        "start_to_first_reply_s": {
            "median": round(statistics.median(starts), 3),
            "min": round(min(starts), 3),
            "max": round(max(starts), 3),
        },
        "flush_s_median": round(statistics.median(flushes), 3) if flushes else None,
        "package_bytes": package.stat().st_size,
        "package_bytes_on_disk": package.stat().st_blocks * 512,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--blueprint", default="out/blueprint")
    args = p.parse_args()
    bp = Path(args.blueprint)
    config = NetworkConfig(
        namespace_prefix="dbrun",
        namespace_count=1,
        host_veth_cidr="10.242.0.0/24",
        namespace_veth_cidr="10.243.0.0/24",
    )
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="drafter-bench-", dir="out") as tmp:
        config = NetworkConfig(**{**config.to_dict(), "state_dir": f"{tmp}/net"})
        with Network(config) as net:
            ns = net.namespaces[0]
            for mib in (512, 2048):
                package = Path(tmp) / f"redis-{mib}.drft"
                make_package(bp, ns.namespace, mib, package)
                results[f"{mib}MiB"] = measure(package, ns.namespace, ns.external_address,
                                               args.rounds)  # fmt: skip
    small = results["512MiB"]["start_to_first_reply_s"]["median"]  # type: ignore[index]
    large = results["2048MiB"]["start_to_first_reply_s"]["median"]  # type: ignore[index]
    results["ratio_2048_to_512"] = round(large / small, 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
