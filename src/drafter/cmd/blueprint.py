"""drafter-blueprint: build the kernel, initramfs and disk of a blueprint."""

from __future__ import annotations

import sys
from pathlib import Path

from drafter import cli
from drafter.blueprint import addfiles, disk
from drafter.blueprint.apps import RECIPES
from drafter.blueprint.builder import BlueprintSpec, build
from drafter.blueprint.minecraft import DEFAULT_VERSION
from drafter.blueprint.oci import OciOptions, parse_args_list
from drafter.errors import DrafterError
from drafter.progress import Steps

PROG = "drafter-blueprint"


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(PROG, "Build a blueprint (kernel, initramfs, disk) from Debian packages.")
    p.add_argument(
        "--app", default=None, help=f"application: {', '.join(sorted(RECIPES))} (default: redis)"
    )
    p.add_argument(
        "--minecraft-version",
        default="",
        metavar="V",
        help=f"with --app minecraft: the Minecraft Java version (default: {DEFAULT_VERSION})",
    )
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
    p.add_argument(
        "--add-file",
        action="append",
        default=[],
        metavar="HOST:GUEST",
        help="copy a host file to this absolute guest path before the customize script "
        "(repeatable; its content is part of the cache key)",
    )
    p.add_argument(
        "--ready-port",
        type=int,
        default=0,
        metavar="PORT",
        help="with --app none: liveness also waits until this TCP port accepts connections",
    )
    oci_group = p.add_argument_group(
        "container images (see docs/oci.md)",
        "Run an OCI image as the VM's service instead of --app.",
    )
    oci_group.add_argument(
        "--oci-image",
        default="",
        metavar="REF",
        help="OCI layout directory (PATH[:TAG]), oci-archive tar or docker save tar",
    )
    oci_group.add_argument(
        "--oci-entrypoint", default=None, help="entrypoint (JSON array or shell words)"
    )
    oci_group.add_argument("--oci-cmd", default=None, help="command (JSON array or shell words)")
    oci_group.add_argument(
        "--oci-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable (repeatable)",
    )
    oci_group.add_argument("--oci-workdir", default="", help="working directory")
    oci_group.add_argument("--oci-user", default="", help="user[:group], names or numbers")
    oci_group.add_argument(
        "--oci-ready-port",
        type=int,
        default=0,
        metavar="PORT",
        help="liveness also waits until this TCP port accepts connections",
    )
    oci_group.add_argument(
        "--oci-max-size",
        default="",
        metavar="SIZE",
        help="the most the image's layers may unpack to (default: --disk-size if given, else 4G)",
    )
    p.add_argument("--output-dir", default="out/blueprint", help="where the blueprint goes")
    p.add_argument("--cache-dir", default="out/cache", help="content-addressed build cache")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        script = ""
        if args.customize_script:
            try:
                script = Path(args.customize_script).read_text()
            except OSError as e:
                raise DrafterError(f"cannot read --customize-script: {e.strerror}") from None
        options = None
        if args.oci_image:
            if args.app is not None:
                raise DrafterError("--app and --oci-image exclude each other")
            options = OciOptions(
                image=args.oci_image,
                entrypoint=None
                if args.oci_entrypoint is None
                else parse_args_list(args.oci_entrypoint, "--oci-entrypoint"),
                cmd=None if args.oci_cmd is None else parse_args_list(args.oci_cmd, "--oci-cmd"),
                env=args.oci_env,
                workdir=args.oci_workdir,
                user=args.oci_user,
                ready_port=args.oci_ready_port,
                max_size=disk.parse_size(args.oci_max_size) if args.oci_max_size else 0,
            )
        else:
            used = [f for f in ("oci_entrypoint", "oci_cmd") if getattr(args, f) is not None]
            used += [f for f in ("oci_env", "oci_workdir", "oci_user", "oci_ready_port",
                                 "oci_max_size")
                     if getattr(args, f)]  # fmt: skip
            if used:
                flag = "--" + used[0].replace("_", "-")
                raise DrafterError(f"{flag} needs --oci-image")
        spec = BlueprintSpec(
            app=args.app or "redis",
            disk_size=args.disk_size,
            guest_cidr=args.guest_cidr,
            gateway=args.gateway_ip,
            extra_packages=[x for x in args.extra_packages.split(",") if x],
            customize_script=script,
            kernel_path=args.kernel_path,
            oci=options,
            minecraft_version=args.minecraft_version,
            added_files=addfiles.parse_all(args.add_file),
            ready_port=args.ready_port,
        )
        spec.recipe()  # an unknown app or version is refused before the root check
        cli.require_root(PROG)
        bp = build(spec, Path(args.output_dir), Path(args.cache_dir), Steps())
        print(f"blueprint ready: {bp.kernel}, {bp.initramfs}, {bp.disk}")
        return 0

    return cli.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
