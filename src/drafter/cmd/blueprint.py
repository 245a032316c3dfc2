"""drafter-blueprint: build the kernel, initramfs and disk of a blueprint."""

from __future__ import annotations

import sys
from pathlib import Path

from drafter import cli
from drafter.blueprint.apps import RECIPES
from drafter.blueprint.builder import BlueprintSpec, build
from drafter.errors import DrafterError
from drafter.progress import Steps

PROG = "drafter-blueprint"


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(PROG, "Build a blueprint (kernel, initramfs, disk) from Debian packages.")
    p.add_argument("--app", default="redis", help=f"application: {', '.join(sorted(RECIPES))}")
    p.add_argument(
        "--disk-size", default="", help="disk image size (default: the app's, e.g. 384M)"
    )
    p.add_argument("--guest-cidr", default="172.100.100.2/30", help="guest address")
    p.add_argument("--gateway-ip", default="172.100.100.1", help="guest gateway")
    p.add_argument("--kernel-path", default="", help="your own ELF vmlinux instead of Debian's")
    p.add_argument("--extra-packages", default="", help="comma-separated Debian packages to add")
    p.add_argument(
        "--customize-script", default="", help="shell script run in the guest tree (chroot)"
    )
    p.add_argument("--output-dir", default="out/blueprint", help="where the blueprint goes")
    p.add_argument("--cache-dir", default="out/cache", help="content-addressed build cache")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        cli.require_root(PROG)
        script = ""
        if args.customize_script:
            try:
                script = Path(args.customize_script).read_text()
            except OSError as e:
                raise DrafterError(f"cannot read --customize-script: {e.strerror}") from None
        spec = BlueprintSpec(
            app=args.app,
            disk_size=args.disk_size,
            guest_cidr=args.guest_cidr,
            gateway=args.gateway_ip,
            extra_packages=[x for x in args.extra_packages.split(",") if x],
            customize_script=script,
            kernel_path=args.kernel_path,
        )
        bp = build(spec, Path(args.output_dir), Path(args.cache_dir), Steps())
        print(f"blueprint ready: {bp.kernel}, {bp.initramfs}, {bp.disk}")
        return 0

    return cli.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
