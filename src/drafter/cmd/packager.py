"""drafter-packager: boot a blueprint, wait for liveness, snapshot it into a .drft package."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from drafter import cli
from drafter.blueprint.builder import Blueprint
from drafter.cmd import storeflags
from drafter.package import add_index, open_package
from drafter.vm import VMShape, package_blueprint
from drafter.vmm.base import DEFAULT_BOOT_ARGS

PROG = "drafter-packager"


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(PROG, __doc__.split(": ", 1)[1])
    p.add_argument("--netns", default="ark0", help="network namespace for the VM")
    p.add_argument("--memory-size", type=int, default=1024, help="guest memory in MiB")
    p.add_argument("--cpu-count", type=int, default=1, help="number of vCPUs")
    p.add_argument("--boot-args", default=DEFAULT_BOOT_ARGS, help="kernel command line")
    p.add_argument("--kernel-path", default="out/blueprint/drafter.drftkernel")
    p.add_argument("--initramfs-path", default="out/blueprint/drafter.drftinitramfs")
    p.add_argument("--disk-path", default="out/blueprint/drafter.drftdisk")
    p.add_argument("--package-output-path", default="out/app.drft",
                   help="package to write: a file or s3://BUCKET/KEY")  # fmt: skip
    storeflags.add(p, writes=True)
    p.add_argument("--token-file", default="",
                   help="seal the package's index with this token (else "
                   "$DRAFTER_TOKEN)")  # fmt: skip
    p.add_argument("--add-index", default="", metavar="PACKAGE",
                   help="only give an older package (without an index) one, in place, "
                   "and exit")  # fmt: skip
    p.add_argument("--liveness-timeout", type=float, default=300, help="seconds to wait")
    p.add_argument("--liveness-vsock-port", type=int, default=25, help="seed compatibility")
    p.add_argument("--agent-vsock-port", type=int, default=26, help="seed compatibility")
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    p.add_argument("--hot-window", type=float, default=2.0,
                   help="seconds of a trial resume that record the chunks a resumed VM "
                   "touches first, for peers to fetch before resuming (0: skip)")  # fmt: skip
    p.add_argument("--enable-input", action="store_true", help="(accepted; console in logs)")
    p.add_argument("--enable-output", action="store_true", help="(accepted; console in logs)")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        if args.add_index:
            digest = add_index(Path(args.add_index), storeflags.key(args))
            print(f"index added to {args.add_index} (index digest {digest})")
            return 0
        cli.require_root(PROG)
        blueprint = Blueprint(
            Path(args.kernel_path), Path(args.initramfs_path), Path(args.disk_path)
        )
        shape = VMShape(args.memory_size, args.cpu_count, args.boot_args, accel=args.accel)
        output = storeflags.output(args, args.package_output_path)
        key = storeflags.key(args)
        asyncio.run(output.check())
        try:
            t = asyncio.run(
                package_blueprint(
                    blueprint, output.local, args.netns or None, shape,
                    args.liveness_timeout, args.hot_window, key,
                )
            )  # fmt: skip
            digest = open_package(output.local).index_digest()
            asyncio.run(output.publish())
        finally:
            output.discard()
        out = args.package_output_path
        print(f"package written to {out} (guest live after {t.boot_to_liveness:.1f}s, "
              f"index digest {digest})")  # fmt: skip
        return 0

    return cli.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
