"""Build a blueprint (kernel, initramfs, disk) with a content-addressed cache.

Each artifact is cached under a key made of everything that goes into it, so the
same inputs reuse the previous result; ``out/blueprint`` gets copies (reflinked
where the file system allows it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from drafter.blueprint import addfiles, container, disk, initramfs, kernel, minecraft, oci
from drafter.blueprint.addfiles import AddedFile
from drafter.blueprint.apps import OCI, RECIPES, AppRecipe, minecraft_recipe
from drafter.errors import DrafterError
from drafter.progress import Steps

log = logging.getLogger(__name__)

KERNEL_NAME = "drafter.drftkernel"
INITRAMFS_NAME = "drafter.drftinitramfs"
DISK_NAME = "drafter.drftdisk"
# Bump when the way artifacts are made changes, so old caches are not reused.
BUILD_VERSION = "1"


@dataclass
class BlueprintSpec:
    """Everything that decides what a blueprint contains."""

    app: str = "redis"
    disk_size: str = ""  # empty: the app's default
    guest_cidr: str = "172.100.100.2/30"
    gateway: str = "172.100.100.1"
    extra_packages: list[str] = field(default_factory=list)
    customize_script: str = ""  # shell text run in the chroot
    kernel_path: str = ""  # the user's own ELF vmlinux; empty: Debian's cloud kernel
    oci: oci.OciOptions | None = None  # an OCI image run as the VM's service (app "oci")
    minecraft_version: str = ""  # app "minecraft": empty is minecraft.DEFAULT_VERSION
    added_files: list[AddedFile] = field(default_factory=list)  # --add-file, in order
    ready_port: int = 0  # app "none": liveness also waits for this TCP port

    def recipe(self) -> AppRecipe:
        """The app's recipe; DrafterError for an unknown app or version."""
        if self.minecraft_version and self.app != "minecraft":
            raise DrafterError("--minecraft-version needs --app minecraft")
        if self.ready_port:
            if self.app != "none" or self.oci is not None:
                raise DrafterError(
                    "--ready-port needs --app none (an app's recipe, or --oci-ready-port, "
                    "names its own port)"
                )
            if not 0 < self.ready_port < 65536:
                raise DrafterError(f"--ready-port must be 1-65535, not {self.ready_port}")
            return dataclasses.replace(RECIPES["none"], port=self.ready_port)
        if self.oci is not None:
            return OCI
        if self.app == "minecraft":
            return minecraft_recipe(self.minecraft_version or minecraft.DEFAULT_VERSION)
        try:
            return RECIPES[self.app]
        except KeyError:
            raise DrafterError(
                f"unknown app {self.app!r} (choose from {', '.join(sorted(RECIPES))})"
            ) from None


@dataclass(frozen=True)
class Blueprint:
    """What a VM boots from: a kernel, an initramfs and a root disk image (files)."""

    kernel: Path
    initramfs: Path
    disk: Path

    @classmethod
    def at(cls, directory: Path) -> Blueprint:
        """The blueprint in ``directory`` under the seed's names (drafter.drftkernel, ...)."""
        return cls(directory / KERNEL_NAME, directory / INITRAMFS_NAME, directory / DISK_NAME)


def _key(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _guest_code_hash() -> str:
    h = hashlib.sha256()
    pkg = resources.files("drafter.guest")
    for name in ("__init__.py", "channel.py", "agent.py", "liveness.py"):
        h.update(pkg.joinpath(name).read_bytes())
    h.update(Path(disk.__file__).read_bytes())
    return h.hexdigest()[:16]


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(src), str(tmp)], check=True)
    os.replace(tmp, dst)


@contextmanager
def _cache_entry(cache: Path, name: str) -> Iterator[tuple[Path, bool]]:
    """(directory, present) for a cache entry; a failed build leaves no entry."""
    final = cache / name
    if (final / ".done").exists():
        yield final, True
        return
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        yield work, False
        (work / ".done").touch()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build(spec: BlueprintSpec, out_dir: Path, cache: Path, steps: Steps | None = None) -> Blueprint:
    """Build (or reuse) the blueprint described by ``spec`` into ``out_dir``."""
    recipe = spec.recipe()
    if spec.oci is not None:
        spec.oci.check()
    if spec.disk_size:
        size = disk.parse_size(spec.disk_size)
    else:  # 0: derived from the image
        size = 0 if spec.oci else disk.parse_size(recipe.disk_size)
    steps = steps or Steps()
    out = Blueprint.at(out_dir)
    if spec.kernel_path and not Path(spec.kernel_path).is_file():
        raise DrafterError(f"kernel {spec.kernel_path} does not exist")
    if spec.kernel_path and not kernel.is_elf(Path(spec.kernel_path)):
        raise DrafterError(f"kernel {spec.kernel_path} is not an ELF vmlinux (PVH)")
    with contextlib.ExitStack() as stack:
        image = None
        if spec.oci is not None:  # a bad image fails here, before anything is built
            with steps.step(f"OCI image {spec.oci.image} (copied, checked)"):
                image = stack.enter_context(oci.open_image(spec.oci, cache, size))
        payload = _payload(spec, recipe, cache, steps)  # no npm: fails before the kernel
        kdir = _kernel(spec, cache, steps)
        rkey, tree = _rootfs(spec, recipe, payload, cache, steps)
        if image is None or spec.oci is None:
            ddir = _disk(cache, _key("disk", rkey, size), size, steps, lambda d: tree)
        else:
            ddir = _oci_disk(spec.oci, image, rkey, tree, size, cache, steps)
    with steps.step("copy to " + str(out_dir)):
        _copy(kdir / KERNEL_NAME, out.kernel)
        _copy(kdir / INITRAMFS_NAME, out.initramfs)
        _copy(ddir / DISK_NAME, out.disk)
    return out


def _kernel(spec: BlueprintSpec, cache: Path, steps: Steps) -> Path:
    """Kernel and initramfs: keyed by the kernel package version."""
    if spec.kernel_path:
        kver = "user:" + hashlib.sha256(Path(spec.kernel_path).read_bytes()).hexdigest()[:16]
    else:
        kver = kernel.resolve_kernel_package()
    kkey = _key("kernel", BUILD_VERSION, kver, initramfs.INIT, initramfs.GUEST_MODULES)
    with _cache_entry(cache, f"kernel-{kkey}") as (kdir, present):
        if present:
            steps.skip(f"kernel {kver} (cached)")
        elif spec.kernel_path:
            with steps.step(f"kernel from {spec.kernel_path}"):
                shutil.copy2(spec.kernel_path, kdir / KERNEL_NAME)
                initramfs.build_initramfs(kdir / INITRAMFS_NAME, None)
        else:
            with steps.step(f"kernel {kver} from Debian"):
                pkg = kernel.fetch_debian_kernel(kdir / "work", kver)
                shutil.move(pkg.vmlinux, kdir / KERNEL_NAME)
            with steps.step("initramfs"):
                initramfs.build_initramfs(kdir / INITRAMFS_NAME, pkg.modules)
            shutil.rmtree(kdir / "work")
    return cache / f"kernel-{kkey}"


def rootfs_key(spec: BlueprintSpec, recipe: AppRecipe, payload: Path | None) -> str:
    """The cache key of the root tree: everything that goes into it."""
    return _key(
        "rootfs",
        BUILD_VERSION,
        disk.BASE_PACKAGES + recipe.packages + spec.extra_packages,
        asdict(recipe),
        asdict(disk.GuestNetwork(spec.guest_cidr, spec.gateway)),
        spec.customize_script,
        _guest_code_hash(),
        payload.parent.name if payload else "",  # the staged files, by their key
        [(f.guest, f.mode, f.digest) for f in spec.added_files],  # by content, not path
    )


def _rootfs(
    spec: BlueprintSpec, recipe: AppRecipe, payload: Path | None, cache: Path, steps: Steps
) -> tuple[str, Path]:
    """The root tree, keyed by what is installed: (its key, the tree)."""
    packages = disk.BASE_PACKAGES + recipe.packages + spec.extra_packages
    net = disk.GuestNetwork(spec.guest_cidr, spec.gateway)
    rkey = rootfs_key(spec, recipe, payload)
    with _cache_entry(cache, f"rootfs-{rkey}") as (rdir, present):
        if present:
            steps.skip("root file system (cached)")
        else:
            with steps.step(f"root file system: Debian bookworm + {recipe.name}"):
                disk.install_rootfs(rdir / "tree", packages)
            if payload is not None:
                target = rdir / "tree" / recipe.payload
                target.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["cp", "-a", str(payload), str(target)], check=True)
            if spec.added_files:
                with steps.step(f"{len(spec.added_files)} added file(s)"):
                    addfiles.install(rdir / "tree", spec.added_files)
            with steps.step("guest configuration, agent and liveness"):
                disk.customize(rdir / "tree", recipe, net, spec.customize_script)
    return rkey, cache / f"rootfs-{rkey}" / "tree"


def _payload(spec: BlueprintSpec, recipe: AppRecipe, cache: Path, steps: Steps) -> Path | None:
    """The app's files built on the host (cached by what makes them), or None."""
    if not recipe.payload:
        return None
    version = spec.minecraft_version or minecraft.DEFAULT_VERSION
    name = f"minecraft-{minecraft.stage_key(version)}"
    with _cache_entry(cache, name) as (sdir, present):
        if present:
            steps.skip(f"Minecraft server {version} (cached)")
        else:
            with steps.step(f"Minecraft server {version}: flying-squid from the npm registry"):
                minecraft.stage(sdir / "server", version)
            shutil.rmtree(sdir / "npm-cache", ignore_errors=True)
    return cache / name / "server"


def _disk(
    cache: Path, dkey: str, size: int, steps: Steps, make_tree: Callable[[Path], Path]
) -> Path:
    """An ext4 image of ``size`` bytes (cached under ``dkey``) of ``make_tree(workdir)``."""
    with _cache_entry(cache, f"disk-{dkey}") as (ddir, present):
        if present:
            steps.skip(f"disk image {size >> 20}M (cached)")
        else:
            tree = make_tree(ddir)
            with steps.step(f"disk image {size >> 20}M (ext4)"):
                disk.make_image(tree, ddir / DISK_NAME, size)
            if tree.is_relative_to(ddir):
                shutil.rmtree(tree)
    return cache / f"disk-{dkey}"


def auto_size(need: int) -> int:
    """Room for ``need`` bytes plus headroom for what the service writes, in whole MiB."""
    headroom = max(256 << 20, need // 2)
    return ((need + headroom + (1 << 20) - 1) >> 20) << 20


def _oci_disk(
    options: oci.OciOptions,
    image: oci.ImportedImage,
    rkey: str,
    tree: Path,
    size: int,
    cache: Path,
    steps: Steps,
) -> Path:
    """The base tree plus the image as a runtime bundle, keyed by the image's content.

    The key is the image's content, so the same image reached through another form
    (docker save, oci-archive) reuses the cache. ``size`` 0: derived from the image.
    """
    bkey = _key("bundle", BUILD_VERSION, image.content_key(), options.overrides(), _oci_hash())
    with _cache_entry(cache, f"bundle-{bkey}") as (bdir, present):
        if present:
            steps.skip("container bundle (cached)")
        else:
            with steps.step("container bundle (umoci unpack)"):
                oci.unpack(image, options, bdir / "bundle")
    bundle = cache / f"bundle-{bkey}" / "bundle"
    need = disk.required_size(tree, bundle)
    size = size or auto_size(need)
    disk.check_fits(size, need)

    def merged(workdir: Path) -> Path:
        with steps.step("guest root file system + container bundle"):
            # Hard links (cache and work dir share a file system): mkfs only reads them.
            root = workdir / "tree"
            subprocess.run(["cp", "-al", f"{tree}/.", str(root)], check=True)
            target = root / container.GUEST_BUNDLE
            target.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-al", str(bundle), str(target)], check=True)
            # A new file, not a write through the link into the cached base tree.
            (root / disk.LIVENESS_SERVICE).unlink()
            disk.install_liveness(
                root, container.SERVICE, container.liveness_args(options.ready_port)
            )
        return root

    dkey = _key("disk", rkey, bkey, size, options.ready_port)
    return _disk(cache, dkey, size, steps, merged)


def _oci_hash() -> str:
    """How bundles are made: the code that makes them."""
    h = hashlib.sha256()
    for module in (oci, container):
        h.update(Path(str(module.__file__)).read_bytes())
    return h.hexdigest()[:16]
