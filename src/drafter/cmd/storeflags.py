"""The object-storage flags every command that reads or writes a package shares."""

from __future__ import annotations

import argparse

from drafter.errors import DrafterError
from drafter.index import index_key
from drafter.objects.location import StoreOptions, parse_location
from drafter.objects.upload import PackageOutput
from drafter.transport import security


def add(parser: argparse.ArgumentParser, writes: bool) -> None:
    """``--s3-virtual-hosted`` (and, for a command that writes a package,
    ``--if-absent``); credentials come from the AWS environment, never a flag."""
    parser.add_argument(
        "--s3-virtual-hosted", action="store_true",
        help="s3:// addresses the bucket as BUCKET.ENDPOINT (default: ENDPOINT/BUCKET); "
        "endpoint, region and credentials come from the AWS environment (AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, ...): see docs/objectstore.md",
    )  # fmt: skip
    if writes:
        parser.add_argument(
            "--if-absent", action="store_true",
            help="refuse to replace an existing package (s3://: a conditional upload)",
        )  # fmt: skip


def add_checkpoint(parser: argparse.ArgumentParser, resume_hint: str) -> None:
    """``--checkpoint`` and its settings (docs/checkpoints.md)."""
    parser.add_argument("--checkpoint", default="", metavar="s3://BUCKET/PREFIX",
                        help="checkpoint the running VM there continuously, holding its "
                        f"lease ({resume_hint}; SIGUSR2 asks for a checkpoint at "
                        "once)")  # fmt: skip
    parser.add_argument("--checkpoint-interval", type=float, default=30, metavar="SECONDS",
                        help="seconds between checkpoints")  # fmt: skip
    parser.add_argument("--checkpoint-keep", type=int, default=3, metavar="N",
                        help="generations kept (older ones expire, never the latest)")  # fmt: skip
    parser.add_argument("--lease-time", type=float, default=15, metavar="SECONDS",
                        help="the VM's lease: without a renewal for 80 %% of it the VM "
                        "pauses; a recovering peer waits all of it")  # fmt: skip


def check_checkpoint(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checkpoint flags' bounds and URL: argparse's one-line error if not."""
    if not 1.0 <= args.checkpoint_interval <= 86400:
        parser.error("--checkpoint-interval must be between 1 and 86400 seconds")
    if not 1 <= args.checkpoint_keep <= 10000:
        parser.error("--checkpoint-keep must be between 1 and 10000")
    if not 2.0 <= args.lease_time <= 3600:
        parser.error("--lease-time must be between 2 and 3600 seconds")
    if args.checkpoint:
        try:
            where = parse_location(args.checkpoint, "--checkpoint")
        except DrafterError as e:
            parser.error(str(e))
        if where.scheme != "s3":
            parser.error("--checkpoint needs an S3 prefix (s3://BUCKET/PREFIX)")


def checkpoint_store(args: argparse.Namespace) -> StoreOptions:
    """How the checkpoints' store is reached (the same flags as a package's)."""
    return StoreOptions(
        retry_timeout=getattr(args, "retry_timeout", 30.0),
        tls_ca=getattr(args, "tls_ca", "") or None,
        virtual_hosted=args.s3_virtual_hosted,
    )


def add_pin(parser: argparse.ArgumentParser) -> None:
    """``--index-digest``: the BLAKE3 digest an object's index must have."""
    parser.add_argument(
        "--index-digest", type=digest, default=None, metavar="HEX",
        help="an s3:// or http(s):// package's index must have this BLAKE3 digest (what "
        "drafter-packager prints; not needed when the package was written with the token)",
    )  # fmt: skip


def digest(text: str) -> bytes:
    """A BLAKE3 digest given as 64 hexadecimal digits (an argparse type)."""
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 32:
        raise argparse.ArgumentTypeError("give 64 hexadecimal digits (a BLAKE3 digest)")
    return value


def store_options(a: argparse.Namespace, retry_timeout: float = 30.0) -> StoreOptions:
    return StoreOptions(
        retry_timeout=retry_timeout,
        tls_ca=getattr(a, "tls_ca", None) or None,
        virtual_hosted=a.s3_virtual_hosted,
    )


def output(a: argparse.Namespace, target: str) -> PackageOutput:
    """Where the command writes its package (a path or an s3:// object)."""
    return PackageOutput(target, a.if_absent, store_options(a))


def key(a: argparse.Namespace) -> bytes | None:
    """The index key from ``--token-file`` or $DRAFTER_TOKEN (None without a token)."""
    token = security.load_token(getattr(a, "token_file", None) or None)
    return index_key(token) if token else None
