"""drafter-runner: resume a VM from a .drft package; Ctrl-C snapshots it back."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from drafter import cli, console
from drafter.cmd import storeflags
from drafter.network.follow import Follower
from drafter.network.follow import add_flags as add_follow_flags
from drafter.vm import LocalVM

PROG = "drafter-runner"


async def run(a: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    follower = Follower(a.netns or None, a.state_dir, a.stable_address or None)
    await asyncio.to_thread(follower.prepare)
    output = storeflags.output(a, a.package_output_path or a.package_path)
    await output.check()
    vm = LocalVM(
        Path(a.package_path),
        a.netns or None,
        persist=a.persist,
        accel=a.accel,
        key=storeflags.key(a),
        output=output.local,
    )
    try:
        async with vm:
            await asyncio.to_thread(follower.running)
            code = await _until_ctrl_c(a, vm, stop)
        if a.persist:
            await output.publish()
        return code
    finally:
        output.discard()
        await asyncio.to_thread(follower.release)


async def _until_ctrl_c(a: argparse.Namespace, vm: LocalVM, stop: asyncio.Event) -> int:
    loop = asyncio.get_running_loop()
    print(f"resumed {a.package_path}; Ctrl-C to snapshot and stop", flush=True)
    assert vm.machine is not None
    attach = asyncio.create_task(
        console.attach(vm.machine.console_socket, a.enable_input, a.enable_output)
    )
    try:
        with (
            console.raw_terminal(sys.stdin.fileno()) if a.enable_input else contextlib.nullcontext()
        ):
            await stop.wait()
    finally:
        attach.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: None)  # finish the flush first
    took = await vm.suspend_and_flush()
    what = "discarded (--persist=false)"
    if vm.persist:
        what = f"written to {a.package_output_path}" if a.package_output_path else "written back"
    print(f"snapshot {what} in {took:.2f}s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(PROG, __doc__.split(": ", 1)[1])
    p.add_argument("--netns", default="ark0", help="network namespace for the VM")
    add_follow_flags(p)
    p.add_argument("--package-path", default="out/app.drft", help="package to resume")
    p.add_argument(
        "--persist", type=cli.boolean, default=True, nargs="?", const=True,
        help="write the snapshot back to the package on Ctrl-C (--persist=false: never)",
    )  # fmt: skip
    p.add_argument("--package-output-path", default="",
                   help="write the snapshot here on Ctrl-C instead (a file or "
                   "s3://BUCKET/KEY; default: back to --package-path)")  # fmt: skip
    storeflags.add(p, writes=True)
    p.add_argument("--token-file", default="",
                   help="seal the written package's index with this token (else "
                   "$DRAFTER_TOKEN)")  # fmt: skip
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    p.add_argument("--enable-input", action="store_true", help="terminal input to the console")
    p.add_argument("--enable-output", action="store_true", help="console output to stdout")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        cli.require_root(PROG)
        return asyncio.run(run(args))

    return cli.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
