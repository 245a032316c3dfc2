"""A Minecraft server moving under a playing client, beside the Redis VM, as JSON.

For the Minecraft VM (``drafter-blueprint --app minecraft``, flying-squid, 512 MiB)
and then the Redis VM (512 MiB), in the same run, with the same drafter-daemon and
three namespaces of our own:

1. lazy start: ``drafter-registry`` serves the package, ``drafter-peer`` starts it in
   the first namespace at a stable address; the time from starting the peer to the
   first successful login of a mineflayer bot (tests/support/minecraft.py), or to the
   first Redis reply;
2. ``--hops`` live migrations along a chain between the three namespaces (0 → 1 → 2
   → 0 → ...), every peer with ``--stable-address`` (as tests/vm/test_minecraft.py
   does), while a client keeps working through the stable address:
   - Minecraft: the bot stays logged in and places blocks (and chats); per hop the
     longest pause it saw (the longest time the server sent it nothing: keep-alives,
     block updates, chat echoes), the longest wait between two confirmed blocks;
     at the end a second bot reads every block the first one placed;
   - Redis: a client writes steadily (bench/migration.py's Writer); per hop the
     longest gap between acknowledged writes;
   and per hop the destination's summary: total time, downtime, MiB moved (logical
   and on the wire).

p50/p95 over the hops. JSON on stdout and in ``--out``. Run as root (after
scripts/install-deps, which installs the bot): ``.venv/bin/python bench/minecraft.py
[--hops 5] [--out bench/results/minecraft.json]``. Blueprints and packages are built
if missing (out/blueprint-minecraft, out/blueprint, out/bench-minecraft/*.drft).
Everything it starts is stopped by PID on the way out, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the bot the tests drive

from common import BIN, first_reply, free_port, make_package  # noqa: E402
from migration import Writer, pct  # noqa: E402
from support.minecraft import BOT_MODULES, Builder, player  # noqa: E402
from wan import (  # noqa: E402
    DOWNTIME,
    MIGRATED,
    RESUMED,
    Proc,
    StepFailed,
    start_daemon,
    terminate_on_sigterm,
    unmount_under,
)

MEMORY_MIB = 512
WIRE = re.compile(r"([0-9.]+) MiB on the wire")


def ensure_package(app: str, blueprint: Path, package: Path, ns: str) -> None:
    """Build the blueprint of ``app`` and its 512 MiB package unless they exist."""
    if not (blueprint / "drafter.drftdisk").exists():
        subprocess.run(
            [BIN / "drafter-blueprint", "--app", app, "--output-dir", str(blueprint)],
            check=True, capture_output=True, timeout=1800,
        )  # fmt: skip
    if package.exists():
        return
    package.parent.mkdir(parents=True, exist_ok=True)
    partial = package.with_suffix(".partial.drft")
    make_package(blueprint, ns, MEMORY_MIB, partial, timeout=900)
    partial.rename(package)


def parse_summary(line: str) -> dict[str, float]:
    """Total, downtime and MiB moved from a destination's "migrated from" line, as
    bench/migration.py reads them (logical MiB: the resources' sum before the ';')."""
    total = MIGRATED.search(line)
    downtime = DOWNTIME.search(line)
    logical = line.split(" moved ", 1)[-1].split(";")[0]
    wire = WIRE.search(line)
    return {
        "total_s": float(total.group(2)) if total else float("nan"),
        "downtime_ms": int(downtime.group(1)) if downtime else float("nan"),
        "moved_MiB": round(sum(float(m) for m in re.findall(r"([0-9.]+) MiB", logical)), 1),
        "wire_MiB": float(wire.group(1)) if wire else float("nan"),
    }


def percentiles(hops: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    return {
        k: {"p50": pct([h[k] for h in hops], 0.5), "p95": pct([h[k] for h in hops], 0.95)}
        for k in keys
    }


class Chain:
    """A registry, then peers along the chain, for one package; all stopped by close()."""

    def __init__(self, work: Path, package: Path, namespaces: list[str], stable: str) -> None:
        self.work = work
        self.namespaces = namespaces
        self.stable = stable
        self.procs: list[Proc] = []
        port = free_port()
        self.registry = self.start(Proc("drafter-registry", [
            str(BIN / "drafter-registry"), "--package-path", str(package),
            "--laddr", f"127.0.0.1:{port}",
        ]))  # fmt: skip
        self.registry.wait_for(re.compile(r"^serving "), time.monotonic() + 120)
        self.raddr = f"127.0.0.1:{port}"
        self.source: Proc | None = None
        self.laddr = ""  # where the source serves the VM
        self.hop = 0

    def start(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def peer(self, raddr: str, ns: str) -> tuple[Proc, str]:
        laddr = f"127.0.0.1:{free_port()}"
        proc = self.start(Proc(f"drafter-peer ({ns})", [
            str(BIN / "drafter-peer"), "--netns", ns, "--raddr", raddr, "--laddr", laddr,
            "--work-dir", str(self.work / "vms"), "--state-dir", str(self.work / "net"),
            "--stable-address", self.stable,
        ]))  # fmt: skip
        return proc, laddr

    def lazy_start(self) -> float:
        """Start the peer in the first namespace; seconds until it resumed the VM."""
        began = time.monotonic()
        self.source, self.laddr = self.peer(self.raddr, self.namespaces[0])
        seen, _, _ = self.source.wait_for(RESUMED, time.monotonic() + 300)
        return seen - began

    def migrate(self) -> dict[str, Any]:
        """One hop to the next namespace of the chain; the destination's figures."""
        assert self.source is not None
        self.hop += 1
        to = self.namespaces[self.hop % len(self.namespaces)]
        dest, laddr = self.peer(self.laddr, to)
        _, match, _ = dest.wait_for(MIGRATED, time.monotonic() + 300)
        line = match.string
        try:
            code = self.source.popen.wait(180)  # exits once the destination holds everything
        except subprocess.TimeoutExpired:
            raise StepFailed(f"the source did not exit:\n{self.source.tail()}") from None
        if code != 0:
            raise StepFailed(f"the source exited {code}:\n{self.source.tail()}")
        self.source, self.laddr = dest, laddr
        return {"to": to, **parse_summary(line), "summary": line.strip()}

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def minecraft(work: Path, package: Path, namespaces: list[str], stable: str,
              hops: int) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"stable_address": stable}
    with ExitStack() as stack:
        chain = Chain(work, package, namespaces, stable)
        stack.callback(chain.close)
        began = time.monotonic()
        wall = time.time()
        out["lazy_start_to_resumed_s"] = round(chain.lazy_start(), 3)
        bot = stack.enter_context(player(stable, "builder", timeout=300))
        login = next(e for e in bot.events if e["event"] == "login")
        out["lazy_start_to_login_s"] = round(login["t"] / 1000 - wall, 3)
        out["lazy_start_to_spawn_s"] = round(time.monotonic() - began, 3)
        builder = Builder(bot)
        builder.start()
        stack.callback(builder.finish)
        time.sleep(3)
        per_hop = []
        for _ in range(hops):
            bot.longest_silence_ms()  # from here
            builder.longest_wait_s = 0.0
            figures = chain.migrate()
            count = len(builder.placed)
            deadline = time.monotonic() + 120
            while len(builder.placed) < count + 5:  # the player builds on at the new host
                if bot.ended():
                    raise StepFailed(f"the player left the server: {bot.ended()}")
                if time.monotonic() > deadline:
                    raise StepFailed(f"the player built nothing after the hop: {builder.failures}")
                time.sleep(0.2)
            figures["longest_pause_ms"] = bot.longest_silence_ms()
            figures["longest_wait_between_blocks_s"] = round(builder.longest_wait_s, 3)
            per_hop.append(figures)
            print(f"minecraft hop {len(per_hop)}: {json.dumps(figures)}", file=sys.stderr,
                  flush=True)  # fmt: skip
        builder.finish()
        placed = [at for _, at in builder.placed]
        out["disconnects"] = len(bot.ended())
        out["blocks_placed"] = len(placed)
        out["failed_placements"] = len(builder.failures)
        with player(stable, "reader", timeout=300) as reader:
            names = reader.blocks(placed)
        out["blocks_present_for_a_second_player"] = sum(n == "stone" for n in names)
        out["all_present"] = all(n == "stone" for n in names)
        out["per_hop"] = per_hop
        out.update(percentiles(per_hop, ["longest_pause_ms", "total_s", "downtime_ms",
                                         "moved_MiB", "wire_MiB"]))  # fmt: skip
    return out


def redis_chain(work: Path, package: Path, namespaces: list[str], stable: str,
                hops: int) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"stable_address": stable}
    writer = Writer([stable])
    with ExitStack() as stack:
        chain = Chain(work, package, namespaces, stable)
        stack.callback(chain.close)
        began = time.monotonic()
        out["lazy_start_to_resumed_s"] = round(chain.lazy_start(), 3)
        first_reply(stable, timeout=300)
        out["lazy_start_to_first_reply_s"] = round(time.monotonic() - began, 3)
        writer.start()

        def stop_writer() -> None:
            writer.stop.set()
            writer.join(10)

        stack.callback(stop_writer)
        time.sleep(2)
        per_hop = []
        for _ in range(hops):
            start = time.monotonic()
            figures = chain.migrate()
            time.sleep(1.5)  # steady state at the new host; the gap window ends here
            gap = writer.longest_gap(start, time.monotonic())
            figures["longest_pause_ms"] = round(gap * 1000)
            per_hop.append(figures)
            print(f"redis hop {len(per_hop)}: {json.dumps(figures)}", file=sys.stderr, flush=True)
        out["acknowledged_writes"] = len(writer.acks)
        out["per_hop"] = per_hop
        out.update(percentiles(per_hop, ["longest_pause_ms", "total_s", "downtime_ms",
                                         "moved_MiB", "wire_MiB"]))  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--hops", type=int, default=5, help="live migrations per VM (at least 1)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "minecraft.json",
                   help="where the JSON goes (also printed)")  # fmt: skip
    p.add_argument("--namespace-prefix", default="mcb")
    p.add_argument("--cidr-base", type=int, default=236,
                   help="10.B.0.0/24 for the veths, 10.B+1.0.0/24 for the VMs' addresses, "
                   "10.B.200.1 and .2 the stable addresses")  # fmt: skip
    p.add_argument("--skip-redis", action="store_true", help="only the Minecraft VM")
    args = p.parse_args()
    if args.hops < 1:
        p.error("--hops must be at least 1")
    if shutil.which("node") is None or not BOT_MODULES.is_dir():
        p.error("the Minecraft bot is not installed (run scripts/install-deps)")
    # Ctrl-C unwinds even when a script started us in the background (SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out_dir = Path("out")
    out_dir.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="drafter-bench-minecraft-", dir=out_dir)).resolve()
    base = args.cidr_base
    results: dict[str, Any] = {
        "hops": args.hops,
        "memory_mib": MEMORY_MIB,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    daemon: Proc | None = None
    try:
        with terminate_on_sigterm():
            daemon, addresses = start_daemon(
                BIN, work / "net", args.namespace_prefix,
                f"10.{base}.0.0/24", f"10.{base + 1}.0.0/24", count=3,
            )  # fmt: skip
            namespaces = sorted(addresses)
            packages = Path("out/bench-minecraft").resolve()
            for app, blueprint in (("minecraft", "out/blueprint-minecraft"),
                                   ("redis", "out/blueprint")):  # fmt: skip
                ensure_package(app, Path(blueprint).resolve(), packages / f"{app}-512.drft",
                               namespaces[0])  # fmt: skip
            runs = [("minecraft", minecraft, f"10.{base}.200.1")]
            if not args.skip_redis:
                runs.append(("redis", redis_chain, f"10.{base}.200.2"))
            for app, run, stable in runs:
                try:
                    results[app] = run(
                        work, packages / f"{app}-512.drft", namespaces, stable, args.hops
                    )
                except Exception as e:  # recorded; the other VM still runs
                    results[app] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{app}: {json.dumps(results[app])}", file=sys.stderr, flush=True)
            results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if daemon is not None:
            daemon.stop()
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
