"""Container images as VMs: the user's OCI image turned into a runtime bundle.

Maintained tools from Debian do the work: ``skopeo`` copies the image (an OCI
layout directory, an ``oci-archive`` tar or a ``docker save`` tar) into a private
OCI layout, checking every blob's digest; ``umoci config`` applies the user's
overrides to the image config; ``umoci unpack`` applies the layers in order,
whiteouts included, and writes the runtime config. Before unpacking, every layer's
entry names are checked here (umoci silently clamps a ``../`` name into the root;
we refuse the image). What the guest does with the bundle is in ``container.py``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import posixpath
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from drafter.blueprint import container
from drafter.errors import DrafterError

log = logging.getLogger(__name__)

ARCH = "amd64"  # the guest kernel's architecture
DEFAULT_MAX_SIZE = 4 << 30  # what an image's layers may unpack to, unless told
WORK_TAG = "image"  # the tag of the image in our private layout
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class OciOptions:
    """The image and what the user changes about how its container starts."""

    image: str  # PATH[:TAG]
    entrypoint: list[str] | None = None  # None: the image's
    cmd: list[str] | None = None  # None: the image's (cleared when entrypoint is set)
    env: list[str] = field(default_factory=list)  # KEY=VALUE, added or replacing
    workdir: str = ""
    user: str = ""
    ready_port: int = 0  # liveness also waits for this TCP port (0: don't)
    max_size: int = 0  # the most bytes its layers may unpack to (0: DEFAULT_MAX_SIZE)

    def overrides(self) -> dict[str, Any]:
        """What changes the unpacked bundle (part of its cache key)."""
        return {
            "entrypoint": self.entrypoint,
            "cmd": self.cmd,
            "env": self.env,
            "workdir": self.workdir,
            "user": self.user,
        }

    def check(self) -> None:
        for item in self.env:
            key, eq, _ = item.partition("=")
            if not eq or not key or any(c.isspace() for c in key):
                raise DrafterError(f"--oci-env expects KEY=VALUE, got {item!r}")
        if not 0 <= self.ready_port <= 65535:
            raise DrafterError(f"--oci-ready-port {self.ready_port} is not a TCP port")


def parse_args_list(text: str, flag: str) -> list[str]:
    """A command line given as a JSON array (``["a", "b c"]``) or as shell words."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise DrafterError(f"{flag}: not a JSON array of strings: {text}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DrafterError(f"{flag}: not a JSON array of strings: {text}")
        return value
    try:
        return shlex.split(text)
    except ValueError as e:
        raise DrafterError(f"{flag}: {e}") from None


# ---------------------------------------------------------------- the image reference


@dataclass(frozen=True)
class ImageRef:
    """Where the user's image is and in which transport skopeo reads it."""

    path: Path
    tag: str  # empty: the only image there
    transport: str  # "oci", "oci-archive" or "docker-archive"
    text: str  # as the user wrote it, for messages

    def skopeo(self) -> str:
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")


def _split(text: str) -> tuple[Path, str]:
    """PATH[:TAG]: the longest existing path before a colon wins (paths may hold colons)."""
    if Path(text).exists():
        return Path(text), ""
    for i in [m.start() for m in re.finditer(":", text)][::-1]:
        if i and Path(text[:i]).exists():
            return Path(text[:i]), text[i + 1 :]
    raise DrafterError(f"OCI image {text} does not exist")


def _docker_name(name: str) -> str:
    """A docker reference in its short form: ``docker.io/library/redis`` → ``redis:latest``."""
    name = name.removeprefix("docker.io/").removeprefix("library/")
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _pick(tags: list[str], count: int, ref: ImageRef, docker: bool = False) -> None:
    """Check that the reference names exactly one image of the ``count`` there.

    ``docker``: the tags are docker references (a docker save tar's ``RepoTags``).
    """
    known = ", ".join(tags) or "none"
    if ref.tag:
        found = (
            _docker_name(ref.tag) in {_docker_name(t) for t in tags} if docker else ref.tag in tags
        )
        if not found:
            raise DrafterError(f"OCI image {ref.path} has no tag {ref.tag!r} (tags: {known})")
    elif count == 0:
        raise DrafterError(f"OCI image {ref.path} holds no image")
    elif count > 1:
        raise DrafterError(
            f"OCI image {ref.path} holds {count} images; name one as {ref.path}:TAG (tags: {known})"
        )


def _index_tags(index: Any, origin: str) -> tuple[list[str], int]:
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise DrafterError(f"OCI image {origin} is malformed: index.json has no manifests")
    manifests = index["manifests"]
    tags = [
        m["annotations"][REF_NAME]
        for m in manifests
        if isinstance(m, dict) and isinstance(m.get("annotations"), dict)
        and REF_NAME in m["annotations"]
    ]  # fmt: skip
    return tags, len(manifests)


def _load_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DrafterError(f"{what} is not valid JSON") from None


def resolve(text: str) -> ImageRef:
    """Find the image ``text`` names and check the tag before any tool runs."""
    path, tag = _split(text)
    if path.is_dir():
        ref = ImageRef(path, tag, "oci", text)
        index_file = path / "index.json"
        if not index_file.is_file() or not (path / "oci-layout").is_file():
            raise DrafterError(f"{path} is not an OCI image layout (no index.json or oci-layout)")
        index = _load_json(index_file.read_bytes(), f"OCI image {path}: index.json")
        _pick(*_index_tags(index, str(path)), ref)
        return ref
    not_image = (
        f"{path} is not a container image (expected an OCI layout directory, "
        "an oci-archive or a docker save tar)"
    )
    try:
        with tarfile.open(path) as tar:
            names = {posixpath.normpath(n) for n in tar.getnames()}

            def member(name: str) -> bytes:
                f = tar.extractfile(name) or tar.extractfile("./" + name)
                if f is None:
                    raise DrafterError(f"OCI image {path} is malformed: {name} unreadable")
                return f.read()

            if "manifest.json" in names:
                ref = ImageRef(path, tag, "docker-archive", text)
                manifest = _load_json(member("manifest.json"), f"{path}: manifest.json")
                if not isinstance(manifest, list):
                    raise DrafterError(f"OCI image {path} is malformed: bad manifest.json")
                tags = [t for m in manifest if isinstance(m, dict) for t in m.get("RepoTags") or []]
                _pick(tags, len(manifest), ref, docker=True)
                return ref
            if "index.json" in names and "oci-layout" in names:
                ref = ImageRef(path, tag, "oci-archive", text)
                index = _load_json(member("index.json"), f"OCI image {path}: index.json")
                _pick(*_index_tags(index, str(path)), ref)
                return ref
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile):
        raise DrafterError(not_image) from None
    raise DrafterError(not_image)


# ------------------------------------------------------------- importing and checking


@dataclass(frozen=True)
class ImportedImage:
    """The user's image copied into a private OCI layout, with its parsed config."""

    ref: ImageRef
    layout: Path
    manifest: dict[str, Any]
    config: dict[str, Any]

    @property
    def image(self) -> str:  # umoci's --image argument
        return f"{self.layout}:{WORK_TAG}"

    def content_key(self) -> str:
        """What the container is made of: layers (uncompressed digests) and run config.

        Not the config's digest: converting between image forms may reformat the
        config (skopeo drops a trailing newline), the content stays the same.
        """
        parts = {k: self.config.get(k) for k in ("architecture", "os", "config", "rootfs")}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class ToolError(DrafterError):
    """skopeo or umoci failed; ``stderr`` is what it said (to tell its failures apart)."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


def _tool(cmd: list[str], what: str) -> str:
    log.debug("running %s", " ".join(cmd))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise DrafterError(f"cannot {what}: {cmd[0]} is not installed") from None
    if p.returncode != 0:
        raise ToolError(f"cannot {what}: {_last_message(p.stderr)}", p.stderr)
    return p.stdout


def _last_message(stderr: str) -> str:
    """The one line that says why skopeo or umoci failed (their logs quote it)."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()] or ["no output"]
    last = lines[-1]
    m = re.search(r'msg="((?:[^"\\]|\\.)*)"', last)
    if m:
        last = m.group(1).replace('\\"', '"')
    return last


def _blob(layout: Path, digest: Any) -> Path:
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise DrafterError(f"OCI image has a malformed digest {digest!r}")
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def import_image(ref: ImageRef, layout: Path) -> ImportedImage:
    """Copy the image (its linux/amd64 variant) into ``layout`` and check its config."""
    shutil.rmtree(layout, ignore_errors=True)
    try:
        _tool(
            ["skopeo", "copy", "--quiet", "--override-os", "linux", "--override-arch", ARCH,
             ref.skopeo(), f"oci:{layout}:{WORK_TAG}"],
            f"read OCI image {ref.text}",
        )  # fmt: skip
    except ToolError as e:
        if "no image found in" not in e.stderr:  # skopeo's words for a missing platform
            raise
        raise DrafterError(
            f"OCI image {ref.text} has no linux/{ARCH} variant; the VM runs linux/{ARCH}"
        ) from None
    index = _load_json((layout / "index.json").read_bytes(), "copied index.json")
    desc = index["manifests"][0]
    manifest = _load_json(_blob(layout, desc["digest"]).read_bytes(), "image manifest")
    config_blob = _blob(layout, manifest.get("config", {}).get("digest"))
    config = _load_json(config_blob.read_bytes(), "image config")
    image = ImportedImage(ref, layout, manifest, config)
    check_platform(image)
    return image


@contextlib.contextmanager
def open_image(options: OciOptions, workroot: Path, limit: int = 0) -> Iterator[ImportedImage]:
    """The image ``options`` name, copied and checked (platform, layers, a command,
    at most ``limit`` bytes unpacked: 0, its ``max_size`` or DEFAULT_MAX_SIZE).

    The private copy lives under ``workroot`` and is removed afterwards.
    """
    ref = resolve(options.image)
    workroot.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".import-", dir=workroot) as tmp:
        image = import_image(ref, Path(tmp) / "layout")
        check_layers(image, limit or options.max_size or DEFAULT_MAX_SIZE)
        check_command(image, options)
        yield image


def check_platform(image: ImportedImage) -> None:
    arch = image.config.get("architecture", "")
    os_ = image.config.get("os", "")
    if arch != ARCH or os_ != "linux":
        raise DrafterError(
            f"OCI image {image.ref.text} is for {os_ or '?'}/{arch or '?'}; "
            f"the VM runs linux/{ARCH}"
        )


@contextlib.contextmanager
def _layer_stream(path: Path, media_type: str) -> Iterator[IO[bytes]]:
    if media_type.endswith("+zstd"):
        p = subprocess.Popen(["zstd", "-dcq", str(path)], stdout=subprocess.PIPE)
        assert p.stdout is not None
        try:
            yield p.stdout
        finally:
            p.stdout.close()
            p.kill()
            p.wait()
    elif media_type.endswith("+gzip"):
        with gzip.open(path, "rb") as f:
            yield f  # type: ignore[misc]
    elif media_type.endswith(".tar") or media_type.endswith(".tar.v1"):
        with path.open("rb") as f:
            yield f
    else:
        raise DrafterError(f"unsupported layer media type {media_type}")


def _escapes(name: str) -> bool:
    norm = posixpath.normpath("./" + name.lstrip("/"))
    return norm == ".." or norm.startswith("../")


def _entries(tar: tarfile.TarFile, stream: IO[bytes]) -> Iterator[tarfile.TarInfo]:
    """The members of a layer (read from ``stream``); like umoci, accept a layer that
    ends without padding.

    (umoci 0.4's own ``insert`` writes such layers: the last member's data is not
    padded to a whole block and the end-of-archive blocks are missing.)
    """
    while True:
        try:
            entry = tar.next()
        except tarfile.ReadError:
            if not stream.read(1):  # the layer just ended: no padding, no end blocks
                return
            raise
        if entry is None:
            return
        yield entry


def check_layers(image: ImportedImage, limit: int = DEFAULT_MAX_SIZE) -> None:
    """Refuse an image whose layers name a path (or whiteout) outside the root, a
    whiteout of ``.`` or ``..``, or whose files add up to more than ``limit`` bytes.

    The unpacker clamps such names into the root; an image that has them is broken
    or hostile, so the user hears about it instead. The sizes are counted from the
    entries' headers as the layers stream by, so a layer that would unpack to far
    more than it weighs (a compression bomb) is refused before anything is written.
    """
    total = 0
    for n, desc in enumerate(image.manifest.get("layers", []), start=1):
        digest = desc.get("digest", "")
        where = f"OCI image {image.ref.text}: layer {n} ({digest[:19]})"
        try:
            with (
                _layer_stream(_blob(image.layout, digest), desc.get("mediaType", "")) as stream,
                tarfile.open(fileobj=stream, mode="r|") as tar,
            ):
                for entry in _entries(tar, stream):
                    base = posixpath.basename(entry.name.rstrip("/"))
                    if _escapes(entry.name):
                        raise DrafterError(f"{where} has a path outside the root: {entry.name}")
                    if entry.islnk() and _escapes(entry.linkname):
                        raise DrafterError(
                            f"{where} has a hard link outside the root: {entry.linkname}"
                        )
                    if base == ".wh." or (base.startswith(".wh..wh.") and base != ".wh..wh..opq"):
                        raise DrafterError(f"{where} has a malformed whiteout: {entry.name}")
                    if base in (".wh..", ".wh..."):  # a whiteout of "." or ".."
                        raise DrafterError(f"{where} has a whiteout of {base[4:]!r}: {entry.name}")
                    total += entry.size if entry.isreg() else 0
                    if total > limit:
                        raise DrafterError(
                            f"OCI image {image.ref.text}: its layers unpack to more than "
                            f"{limit >> 20} MiB (layer {n} is past it at {entry.name}); "
                            "allow more with --oci-max-size or --disk-size"
                        )
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError) as e:
            raise DrafterError(f"{where} is not a readable tar: {e}") from None


def apply_overrides(image: ImportedImage, options: OciOptions) -> None:
    """Change the image config in our private layout with ``umoci config``."""
    args: list[str] = []
    if options.entrypoint is not None:
        # As with docker run --entrypoint: the image's command belongs to its entrypoint.
        args += ["--clear=config.entrypoint", "--clear=config.cmd"]
        args += [f"--config.entrypoint={a}" for a in options.entrypoint]
    if options.cmd is not None:
        args += ["--clear=config.cmd"] + [f"--config.cmd={a}" for a in options.cmd]
    args += [f"--config.env={e}" for e in options.env]
    if options.workdir:
        args.append(f"--config.workingdir={options.workdir}")
    if options.user:
        args.append(f"--config.user={options.user}")
    if args:
        _tool(["umoci", "config", "--image", image.image, *args], "apply the --oci-* options")


def unpack(image: ImportedImage, options: OciOptions, bundle: Path) -> None:
    """A runtime bundle (``rootfs`` + ``config.json``) for the guest's crun.

    ``check_layers`` must have accepted the image.
    """
    apply_overrides(image, options)
    shutil.rmtree(bundle, ignore_errors=True)
    _tool(["umoci", "unpack", "--image", image.image, str(bundle)], "unpack the OCI image")
    spec_file = bundle / "config.json"
    spec = json.loads(spec_file.read_text())
    container.adapt_runtime_spec(spec)
    spec_file.write_text(json.dumps(spec, indent=2) + "\n")
    # umoci's bookkeeping (mtree manifest, umoci.json) is of no use in the guest.
    for extra in bundle.iterdir():
        if extra.name not in ("rootfs", "config.json"):
            extra.unlink()
    (bundle / "hosts").write_text(container.HOSTS)


def check_command(image: ImportedImage, options: OciOptions) -> None:
    """Refuse, before anything is built, an image that would start nothing."""
    config = image.config.get("config") or {}
    entrypoint: list[str] = (
        options.entrypoint if options.entrypoint is not None else config.get("Entrypoint") or []
    )
    cmd: list[str] = options.cmd if options.cmd is not None else config.get("Cmd") or []
    if options.entrypoint is not None and options.cmd is None:
        cmd = []  # as with docker run --entrypoint
    if not entrypoint + cmd:
        raise DrafterError(
            f"OCI image {image.ref.text} has no entrypoint or command; give --oci-cmd"
        )
