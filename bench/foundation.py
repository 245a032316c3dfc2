"""Foundation figures for a 512 MiB Redis VM, printed as JSON.

blueprint build (cold cache, then cached), boot to liveness, snapshot (BeforeSuspend
+ pause + device state), restore to AfterResume, state file size, and the first
Redis reply after restore. Run as root: .venv/bin/python bench/foundation.py
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from drafter import snapshot
from drafter.blueprint.builder import BlueprintSpec, build
from drafter.network import Network, NetworkConfig
from drafter.vmm import MachineConfig, QemuMachine

MEMORY_MIB = 512


def wait_for_redis(address: str, timeout: float = 30) -> float:
    start = time.monotonic()
    # redis-py's own connect retries (up to 1 s of backoff) off: the loop polls.
    client = redis.Redis(host=address, socket_timeout=2, socket_connect_timeout=2,
                         retry=Retry(NoBackoff(), 0))  # fmt: skip
    while True:
        try:
            if client.ping():
                return time.monotonic() - start
        except redis.RedisError:
            if time.monotonic() - start > timeout:
                raise
            time.sleep(0.005)


async def vm_figures(bp_dir: Path, work: Path, net: Network) -> dict[str, float | int]:
    ns0, ns1 = net.namespaces[0], net.namespaces[1]
    bp_disk = work / "disk"
    shutil.copyfile(bp_dir / "drafter.drftdisk", bp_disk)

    def machine(netns: str, run: str) -> QemuMachine:
        config = MachineConfig(
            kernel=bp_dir / "drafter.drftkernel",
            initramfs=bp_dir / "drafter.drftinitramfs",
            disk=bp_disk,
            memory=work / "memory",
            memory_mib=MEMORY_MIB,
            netns=netns,
        )
        return QemuMachine(config, work / run)

    first = machine(ns0.namespace, "run0")
    try:
        boot = await snapshot.boot_to_liveness(first, 300)
        t = snapshot.Timings()
        start = time.monotonic()
        await snapshot.suspend(first, work / "state", t)
        snap = time.monotonic() - start
    finally:
        await first.stop()
    second = machine(ns1.namespace, "run1")
    try:
        t2 = snapshot.Timings()
        start = time.monotonic()
        await snapshot.resume(second, work / "state", t2)
        restore = time.monotonic() - start
        first_reply = restore + wait_for_redis(ns1.external_address)
    finally:
        await second.stop()
    return {
        "boot_to_liveness_s": round(boot, 3),
        "snapshot_s": round(snap, 4),
        "snapshot_pause_and_save_s": round(t.pause_and_save, 4),
        "restore_to_after_resume_s": round(restore, 4),
        "restore_to_first_redis_reply_s": round(first_reply, 4),
        "state_file_bytes": (work / "state").stat().st_size,
    }


def main() -> None:
    out = Path("out")
    with tempfile.TemporaryDirectory(prefix="drafter-bench-", dir=out) as tmp:
        work = Path(tmp)
        start = time.monotonic()
        bp = build(BlueprintSpec(app="redis"), work / "bp", work / "cold-cache")
        cold = time.monotonic() - start
        start = time.monotonic()
        build(BlueprintSpec(app="redis"), work / "bp", work / "cold-cache")
        cached = time.monotonic() - start
        config = NetworkConfig(
            namespace_prefix="dbench",
            namespace_count=2,
            host_veth_cidr="10.240.0.0/24",
            namespace_veth_cidr="10.241.0.0/24",
            state_dir=str(work / "net"),
        )
        with Network(config) as net:
            figures = asyncio.run(vm_figures(bp.disk.parent, work, net))
    result = {
        "memory_mib": MEMORY_MIB,
        "blueprint_build_cold_s": round(cold, 2),
        "blueprint_build_cached_s": round(cached, 3),
        **figures,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
