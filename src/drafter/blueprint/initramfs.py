"""The initramfs: busybox, the virtio modules in dependency order, mount, switch_root."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from drafter.errors import DrafterError

log = logging.getLogger(__name__)

# What the guest needs from the kernel's modules; dependencies are added from modules.dep.
GUEST_MODULES = ["virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "virtio-rng"]
BUSYBOX = Path("/bin/busybox")

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in $(cat /etc/drafter-modules); do
  insmod "/lib/modules/$m" || echo "initramfs: cannot load $m"
done
root=/dev/vda
for i in $(seq 1 200); do [ -b $root ] && break; sleep 0.05; done
if ! mount -o rw $root /newroot; then
  echo "initramfs: cannot mount $root; dropping to a shell"; exec sh
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"""


def module_load_order(modules_dir: Path, wanted: list[str]) -> list[str]:
    """Module paths (relative to ``modules_dir``) so that dependencies load first."""
    dep_file = modules_dir / "modules.dep"
    if not dep_file.exists():
        version = modules_dir.name
        base = modules_dir.parent.parent.parent
        subprocess.run(["depmod", "-b", str(base), version], check=True)
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in dep_file.read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0]
        by_name[name] = path
        by_name[name.replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in deps.get(path, []):
            visit(d)
        order.append(path)

    for name in wanted:
        found = by_name.get(name) or by_name.get(name.replace("-", "_"))
        if found is None:
            log.debug("module %s not found (maybe built in)", name)
            continue
        visit(found)
    return order


def build_initramfs(out: Path, modules_dir: Path | None) -> None:
    """Write a gzip'ed newc cpio initramfs to ``out``."""
    if not BUSYBOX.exists():
        raise DrafterError(f"{BUSYBOX} is missing (install busybox-static)")
    with tempfile.TemporaryDirectory(prefix="drafter-initramfs-") as tmp:
        root = Path(tmp)
        for d in ["bin", "dev", "proc", "sys", "newroot", "etc", "lib/modules"]:
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        order = module_load_order(modules_dir, GUEST_MODULES) if modules_dir else []
        for rel in order:
            dst = root / "lib" / "modules" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(modules_dir / rel, dst)  # type: ignore[operator]
        (root / "etc" / "drafter-modules").write_text("\n".join(order) + "\n")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        p = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=root,
            input=("\n".join(files) + "\n").encode(),
            capture_output=True,
        )
        if p.returncode != 0:
            raise DrafterError(f"cpio failed: {p.stderr.decode().strip()}")
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_bytes(gzip.compress(p.stdout, compresslevel=6))
        os.replace(tmp_out, out)


__all__ = ["build_initramfs", "module_load_order", "GUEST_MODULES"]
