"""Container images for the tests, built here (this machine cannot pull from a registry).

Images are OCI layouts made with umoci from a root file system: busybox from the
host's busybox-static for the small ones, mmdebstrap for Redis. Each is built once
and kept under ``out/test/oci-images`` keyed by the recipe in this file, so later
sessions (and the blueprint cache) reuse it. ``craft_layout`` writes an image by
hand for the malformed inputs no tool would produce.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUSYBOX_APPLETS = ["sh", "httpd", "id", "cat", "ls", "sleep"]

# The entrypoint of the busybox image: report what the container was started with
# where the test can read it over HTTP, then serve /www.
REPORT = (
    '{ echo "GREETING=$GREETING"; echo "IMAGE_VAR=$IMAGE_VAR"; echo "ARG0=$0"; '
    'echo "PWD=$(pwd)"; echo "UID=$(id -u)"; echo "LS=$(ls /www | tr "\\n" " ")"; '
    'echo "OPQ=$(ls /opq)"; read -r hosts < /etc/hosts; echo "HOSTS=$hosts"; } '
    "> /www/env; exec httpd -f -p 8080 -h /www"
)
HTTP_PORT = 8080


def umoci(*args: str) -> None:
    subprocess.run(["umoci", *args], check=True, capture_output=True)


def _cached(root: Path, name: str, make: Callable[[Path], None], *inputs: object) -> Path:
    """An OCI layout at ``root/name-KEY`` made once by ``make``.

    KEY covers the recipe: ``make``'s source and the ``inputs`` it uses.
    """
    recipe = inspect.getsource(make) + repr(inputs)
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    final = root / f"{name}-{key}"
    if (final / "index.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"{name}-*"):  # an earlier recipe's image
        shutil.rmtree(old, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        make(work / "layout")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(work / "layout", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def busybox_image(root: Path) -> Path:
    """Tag ``bb``: four layers (a file replaced, a whiteout, an opaque directory); user 1000."""

    def make(layout: Path) -> None:
        src = layout.parent / "layer1"
        (src / "bin").mkdir(parents=True)
        (src / "www").mkdir()
        shutil.copy2("/bin/busybox", src / "bin" / "busybox")
        for applet in BUSYBOX_APPLETS:
            (src / "bin" / applet).symlink_to("busybox")
        (src / "www" / "kept").write_text("kept\n")
        (src / "www" / "doomed").write_text("doomed\n")
        os.chown(src / "www", 1000, 1000)
        (src / "opq").mkdir()
        (src / "opq" / "old").write_text("old\n")
        newer = layout.parent / "newer"
        newer.write_text("kept, from layer 2\n")
        replacement = layout.parent / "opq"
        replacement.mkdir()
        (replacement / "new").write_text("new\n")
        image = f"{layout}:bb"
        umoci("init", "--layout", str(layout))
        umoci("new", "--image", image)
        umoci("insert", "--image", image, str(src), "/")
        # Layer 2 replaces a file, 3 deletes one (whiteout), 4 replaces a directory.
        umoci("insert", "--image", image, str(newer), "/www/kept")
        umoci("insert", "--image", image, "--whiteout", "/www/doomed")
        umoci("insert", "--image", image, "--opaque", str(replacement), "/opq")
        umoci(
            "config", "--image", image, "--architecture", "amd64", "--os", "linux",
            "--config.entrypoint=/bin/sh", "--config.entrypoint=-c",
            f"--config.entrypoint={REPORT}", "--config.cmd=image-cmd",
            "--config.env=GREETING=from-image", "--config.env=IMAGE_VAR=from-image",
            "--config.workingdir=/www", "--config.user=1000:1000",
        )  # fmt: skip

    return _cached(root, "busybox", make, BUSYBOX_APPLETS, REPORT)


REDIS_CMD = ["--bind", "0.0.0.0", "--protected-mode", "no", "--appendonly", "yes"]
# Like the official image's entrypoint: start as root, hand the data directory to the
# service user, drop privileges (needs Docker's default capabilities).
REDIS_ENTRYPOINT = [
    "/bin/sh", "-c",
    "chown -R redis:redis /data && "
    'exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"',
    "redis-server",
]  # fmt: skip


def redis_image(root: Path) -> Path:
    """Tag ``redis``: Debian's redis-server (mmdebstrap); root hands /data to ``redis``."""

    def make(layout: Path) -> None:
        tree = layout.parent / "rootfs"
        subprocess.run(
            ["mmdebstrap", "--quiet", "--variant=minbase", "--include=redis-server",
             "--dpkgopt=path-exclude=/usr/share/doc/*",
             "--dpkgopt=path-exclude=/usr/share/man/*",
             "--dpkgopt=path-exclude=/usr/share/locale/*",
             "--customize-hook=mkdir -p \"$1/data\"",
             "bookworm", str(tree)],
            check=True, capture_output=True,
        )  # fmt: skip
        image = f"{layout}:redis"
        umoci("init", "--layout", str(layout))
        umoci("new", "--image", image)
        umoci("insert", "--image", image, str(tree), "/")
        umoci(
            "config", "--image", image, "--architecture", "amd64", "--os", "linux",
            *[f"--config.entrypoint={a}" for a in REDIS_ENTRYPOINT],
            *[f"--config.cmd={a}" for a in REDIS_CMD], "--config.workingdir=/data",
        )  # fmt: skip

    return _cached(root, "redis", make, REDIS_ENTRYPOINT, REDIS_CMD)


def copy_layout(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Claimed:
    """A file whose header claims ``size`` bytes that never follow (the layer ends)."""

    size: int


def craft_layout(
    layout: Path,
    entries: list[tuple[str, bytes | Symlink | Claimed]],
    tag: str = "crafted",
    cmd: list[str] | None = ["/bin/sh"],  # noqa: B006 (never changed)
    arch: str = "amd64",
    multi_arch: bool = False,
) -> Path:
    """An OCI layout with one hand-written layer (names as given, even hostile ones).

    ``multi_arch``: the tag names an image index whose one entry is for ``arch``.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if isinstance(data, Symlink):
                info.type = tarfile.SYMTYPE
                info.linkname = data.target
                tar.addfile(info)
            elif isinstance(data, Claimed):
                info.size = data.size
                buf.write(info.tobuf(format=tarfile.PAX_FORMAT))  # and no data
                break
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    layer = _blob(layout, gzip.compress(raw))
    config = _blob(
        layout,
        json.dumps({
            "architecture": arch, "os": "linux", "config": {"Cmd": cmd} if cmd else {},
            "rootfs": {"type": "layers",
                       "diff_ids": [f"sha256:{hashlib.sha256(raw).hexdigest()}"]},
        }).encode(),
    )  # fmt: skip
    manifest = _blob(
        layout,
        json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
        }).encode(),
    )  # fmt: skip
    media_type = "application/vnd.oci.image.manifest.v1+json"
    if multi_arch:
        manifest = _blob(
            layout,
            json.dumps({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [{"mediaType": media_type, **manifest,
                               "platform": {"architecture": arch, "os": "linux"}}],
            }).encode(),
        )  # fmt: skip
        media_type = "application/vnd.oci.image.index.v1+json"
    (layout / "index.json").write_text(
        json.dumps({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": media_type, **manifest,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        })
    )  # fmt: skip
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return layout
