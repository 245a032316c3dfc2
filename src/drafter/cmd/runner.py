"""drafter-runner: resume a VM from a .drft package; Ctrl-C snapshots it back."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from drafter import cli, console
from drafter.checkpoint.running import VMCheckpoints
from drafter.cmd import storeflags
from drafter.errors import DrafterError
from drafter.network.follow import Follower
from drafter.network.follow import add_flags as add_follow_flags
from drafter.vm import FlushFailed, LocalVM

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
    checkpoints = None
    if a.checkpoint:  # the lease first: nothing runs unless this VM may
        checkpoints = VMCheckpoints(
            a.checkpoint, storeflags.checkpoint_store(a), a.lease_time,
            a.checkpoint_interval, a.checkpoint_keep,
        )  # fmt: skip
        await checkpoints.take(recovering=False)
    vm = LocalVM(
        Path(a.package_path),
        a.netns or None,
        persist=a.persist,
        accel=a.accel,
        key=storeflags.key(a),
        output=output.local,
    )
    fenced = asyncio.Event()
    try:
        async with vm:
            await asyncio.to_thread(follower.running)
            if checkpoints is not None:
                _checkpoint(vm, checkpoints, follower, lambda _: fenced.set())
                loop.add_signal_handler(signal.SIGUSR2, _status_and_checkpoint(checkpoints))
            code = await _until_ctrl_c(a, vm, stop, checkpoints, fenced)
            if checkpoints is not None and vm.session is not None:
                # The VM was written back and stopped, its devices still here: the
                # final checkpoint is that same VM. If it fails, the package holds it.
                try:
                    said = await checkpoints.stop_after_suspend(vm.session.state)
                except DrafterError as e:
                    said = f"no final checkpoint ({e}); the package holds the VM"
                if said:
                    print(said, flush=True)
        if a.persist:
            await output.publish()
        return code
    finally:
        if checkpoints is not None:
            await checkpoints.stop(final=False)
        output.discard()
        await asyncio.to_thread(follower.release)


def _checkpoint(
    vm: LocalVM, checkpoints: VMCheckpoints, follower: Follower, fenced: Callable[[str], None]
) -> None:
    """The VM runs: renew its lease and checkpoint it from now on (all is local)."""
    session = vm.session
    assert session is not None and session.machine is not None and session.config is not None
    checkpoints.start(
        session.devices, session.config.to_json(), session.machine, follower, session.work,
        lambda: {}, lambda: None, asyncio.sleep(0), fenced,
    )  # fmt: skip


def _status_and_checkpoint(checkpoints: VMCheckpoints) -> Callable[[], None]:
    def on_usr2() -> None:  # the status line of the checkpoints, and one at once
        print(checkpoints.status(), flush=True)
        checkpoints.request()

    return on_usr2


async def _until_ctrl_c(
    a: argparse.Namespace,
    vm: LocalVM,
    stop: asyncio.Event,
    checkpoints: VMCheckpoints | None,
    fenced: asyncio.Event,
) -> int:
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
            stopped = asyncio.ensure_future(stop.wait())
            taken = asyncio.ensure_future(fenced.wait())
            await asyncio.wait([stopped, taken], return_when="FIRST_COMPLETED")
            stopped.cancel()
            taken.cancel()
    finally:
        attach.cancel()
    if fenced.is_set() and checkpoints is not None:
        raise DrafterError(checkpoints.fenced or "the VM's lease was taken over")
    again, give_up = asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, again.set)  # during the flush: only if it fails
    loop.add_signal_handler(signal.SIGTERM, give_up.set)
    if checkpoints is not None:
        await checkpoints.hold()  # no checkpoint meets the suspend; the lease is renewed on
    try:
        took = await vm.suspend_and_flush()
    except FlushFailed as failed:
        took = await write_back_when_asked(vm, failed, again, give_up)
    what = "discarded (--persist=false)"
    if vm.persist:
        what = f"written to {a.package_output_path}" if a.package_output_path else "written back"
    print(f"snapshot {what} in {took:.2f}s", flush=True)
    return 0


async def write_back_when_asked(
    vm: LocalVM, failed: FlushFailed, again: asyncio.Event, give_up: asyncio.Event
) -> float:
    """A flush failed (a full disk, say): say what is at stake and keep the suspended
    VM until the user either frees space and asks again (``again``: Ctrl-C) or gives
    up (``give_up``: SIGTERM; DrafterError naming what is lost). Seconds the write
    that succeeded took."""
    while True:
        print(f"{PROG}: {failed}; free space and press Ctrl-C to write it again "
              "(SIGTERM gives them up)", file=sys.stderr, flush=True)  # fmt: skip
        again.clear()
        asked = asyncio.ensure_future(again.wait())
        quit_ = asyncio.ensure_future(give_up.wait())
        await asyncio.wait([asked, quit_], return_when="FIRST_COMPLETED")
        asked.cancel()
        quit_.cancel()
        if give_up.is_set():
            raise DrafterError(
                f"gave up writing {failed.target}: the VM's "
                f"{failed.kept / (1 << 20):.0f} MiB of changes since its resume are lost; "
                f"{vm.package_path} holds it as it was when it resumed"
            )
        start = time.monotonic()
        try:
            await vm.write_back()
        except FlushFailed as e:
            failed = e
            continue
        return time.monotonic() - start


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
    storeflags.add_checkpoint(p, "the snapshot is written back as usual on Ctrl-C, and "
                              "the final checkpoint is the same VM")  # fmt: skip
    p.add_argument("--token-file", default="",
                   help="seal the written package's index with this token (else "
                   "$DRAFTER_TOKEN)")  # fmt: skip
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    p.add_argument("--enable-input", action="store_true", help="terminal input to the console")
    p.add_argument("--enable-output", action="store_true", help="console output to stdout")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)
    storeflags.check_checkpoint(p, args)

    def body() -> int:
        cli.require_root(PROG)
        return asyncio.run(run(args))

    return cli.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
