"""The disk: an ext4 image of a Debian bookworm root file system made by mmdebstrap.

mmdebstrap uses the host's configured apt sources (no mirror is written here).
The tree gets the seed's static network setup, a root login on the serial console,
haveged for entropy, the drafter agent and liveness services and the application.
No NTP or DNS server is configured: the agent sets the clock from the host.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from drafter.blueprint.apps import AppRecipe
from drafter.errors import DrafterError

log = logging.getLogger(__name__)

BASE_PACKAGES = [
    "sysvinit-core",
    "ifupdown",
    "iproute2",
    "haveged",
    "util-linux",
    "python3",
    "procps",
]


@dataclass(frozen=True)
class GuestNetwork:
    cidr: str = "172.100.100.2/30"
    gateway: str = "172.100.100.1"


def install_rootfs(tree: Path, packages: list[str]) -> None:
    """mmdebstrap bookworm (minbase) plus ``packages`` into ``tree``."""
    if shutil.which("mmdebstrap") is None:
        raise DrafterError("mmdebstrap is not installed (run scripts/install-deps)")
    shutil.rmtree(tree, ignore_errors=True)
    cmd = [
        "mmdebstrap",
        "--quiet",
        "--variant=minbase",
        "--include=" + ",".join(packages),
        # Documentation and translations only cost disk space in a VM image.
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        # ... but some maintainer scripts link into man1 (openjdk's update-alternatives).
        '--setup-hook=mkdir -p "$1/usr/share/man/man1"',
        "bookworm",
        str(tree),
    ]
    log.debug("running %s", " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise DrafterError(f"mmdebstrap failed: {mmdebstrap_reason(p.stderr)}")


def mmdebstrap_reason(stderr: str) -> str:
    """The line of mmdebstrap's output that says why it failed: a package that did not
    install or could not be found, rather than its last line ("failed to run")."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in lines:
        if "error processing package" in line or line.startswith(
            ("E: Unable to locate package", "E: Package ", "E: Couldn't find")
        ):
            return line
    generic = ("E: mmdebstrap failed to run", "E: setup failed", "E: Sub-process")
    specific = [ln for ln in lines if ln.startswith("E: ") and not ln.startswith(generic)]
    return (specific or lines or ["no output"])[-1]


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _init_script(name: str, command: str, after: str) -> str:
    return f"""#!/bin/sh
### BEGIN INIT INFO
# Provides:          {name}
# Required-Start:    $local_fs $network {after}
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: {name}
### END INIT INFO
PIDFILE=/run/{name}.pid
case "$1" in
  start) start-stop-daemon --start --background --make-pidfile --pidfile $PIDFILE \\
           --output /var/log/{name}.log --startas /bin/sh -- -c "exec {command}" ;;
  stop) start-stop-daemon --stop --quiet --oknodo --pidfile $PIDFILE ;;
  restart) $0 stop; $0 start ;;
  *) echo "usage: $0 start|stop|restart"; exit 1 ;;
esac
exit 0
"""


def install_guest_programs(tree: Path) -> None:
    """Copy the agent and liveness programs (standard library only) into the guest."""
    lib = tree / "usr/lib/drafter/drafter"
    shutil.rmtree(lib, ignore_errors=True)
    (lib / "guest").mkdir(parents=True)
    _write(lib / "__init__.py", "")
    pkg = resources.files("drafter.guest")
    for name in ("__init__.py", "channel.py", "agent.py", "liveness.py"):
        _write(lib / "guest" / name, pkg.joinpath(name).read_text())
    for prog, module in (("drafter-agent", "agent"), ("drafter-liveness", "liveness")):
        _write(
            tree / "usr/sbin" / prog,
            "#!/usr/bin/python3\nimport sys\nsys.path.insert(0, '/usr/lib/drafter')\n"
            f"from drafter.guest.{module} import main\nsys.exit(main())\n",
            0o755,
        )


LIVENESS_SERVICE = "etc/init.d/drafter-liveness"


def install_liveness(tree: Path, after: str, args: str) -> None:
    """The liveness service, started after ``after`` and the agent, with ``args``."""
    command = "/usr/sbin/drafter-liveness" + (f" {args}" if args else "")
    _write(
        tree / LIVENESS_SERVICE,
        _init_script("drafter-liveness", command, f"{after} drafter-agent"),
        0o755,
    )


def customize(tree: Path, app: AppRecipe, net: GuestNetwork, script: str) -> None:
    """Configure the installed tree: network, console, services, the app."""
    _write(
        tree / "etc/network/interfaces",
        "auto lo\niface lo inet loopback\n\n"
        f"auto eth0\niface eth0 inet static\n    address {net.cidr}\n"
        f"    gateway {net.gateway}\n",
    )
    _write(tree / "etc/resolv.conf", "")  # no outside DNS by default
    _write(tree / "etc/hostname", "drafter\n")
    _write(tree / "etc/fstab", "/dev/vda / ext4 rw,relatime 0 1\n")
    inittab = (tree / "etc/inittab").read_text()
    if not any("ttyS0" in ln and not ln.startswith("#") for ln in inittab.splitlines()):
        inittab += "T0:23:respawn:/sbin/getty -L ttyS0 115200 vt100\n"
    # Virtual consoles do not exist on microvm; keep init from respawning them.
    inittab = "\n".join(
        ("#" + line) if line[:1].isdigit() and "tty" in line else line
        for line in inittab.splitlines()
    )
    _write(tree / "etc/inittab", inittab + "\n")
    install_guest_programs(tree)
    after = app.service
    _write(
        tree / "etc/init.d/drafter-agent",
        _init_script("drafter-agent", "/usr/sbin/drafter-agent", after),
        0o755,
    )
    install_liveness(tree, after, f"--wait-tcp {app.port}" if app.port else "")
    setup = "set -e\necho root:root | chpasswd\n" + app.setup + "\n" + script + "\n"
    setup += "update-rc.d drafter-agent defaults >/dev/null\n"
    setup += "update-rc.d drafter-liveness defaults >/dev/null\n"
    p = subprocess.run(
        ["chroot", str(tree), "/bin/sh", "-c", setup], capture_output=True, text=True
    )
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise DrafterError(f"customizing the root file system failed: {tail}")


def tree_size(tree: Path) -> int:
    out = subprocess.run(["du", "-sb", str(tree)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def parse_size(text: str) -> int:
    """Bytes in a size like 384M, 2G, 1048576."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise DrafterError(f"bad size {text!r} (use e.g. 384M or 2G)") from None


def required_size(*trees: Path) -> int:
    """The smallest ext4 image that holds ``trees`` (metadata and reserve included)."""
    return int(sum(tree_size(t) for t in trees) * 1.2) + (24 << 20)


def check_fits(size: int, need: int) -> None:
    if size < need:
        raise DrafterError(
            f"disk size {size >> 20}M is too small for the root file system "
            f"(needs at least {need >> 20}M); raise --disk-size"
        )


def make_image(tree: Path, out: Path, size: int) -> None:
    """ext4 image of ``size`` bytes holding ``tree``; a clear error if it cannot fit."""
    check_fits(size, required_size(tree))
    tmp = out.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with tmp.open("wb") as f:
        f.truncate(size)
    p = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "drafter", "-d", str(tree), str(tmp)],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise DrafterError(f"mkfs.ext4 failed: {tail}")
    os.replace(tmp, out)
