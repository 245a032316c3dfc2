"""The guest side of an OCI blueprint: the bundle's place, its runtime config, its service.

``crun`` (Debian's OCI runtime, installed in the guest) runs the bundle from
``/var/lib/drafter/container`` at boot, in the VM's own network namespace, so the
container answers on the guest address. The container's root is a plain directory
on the VM's ext4 disk: what it writes survives snapshot, resume and migration.
"""

from __future__ import annotations

from typing import Any

GUEST_BUNDLE = "var/lib/drafter/container"  # relative to the guest root
CONTAINER_ID = "drafter"
SERVICE = "drafter-container"
RUNTIME = "crun"  # Debian's crun; the guest installs it

CONTAINER_INIT = f"""#!/bin/sh
### BEGIN INIT INFO
# Provides:          {SERVICE}
# Required-Start:    $local_fs $network
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: the container of the blueprint's OCI image, run by {RUNTIME}
### END INIT INFO
BUNDLE=/{GUEST_BUNDLE}
PIDFILE=/run/{SERVICE}.pid
case "$1" in
  start)
    # sysvinit mounts no cgroup file system; the OCI runtime needs one.
    mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup
    {RUNTIME} delete --force {CONTAINER_ID} >/dev/null 2>&1
    start-stop-daemon --start --background --make-pidfile --pidfile $PIDFILE \\
      --output /var/log/{SERVICE}.log \\
      --exec /usr/bin/{RUNTIME} -- run --bundle $BUNDLE {CONTAINER_ID} ;;
  stop)
    {RUNTIME} kill {CONTAINER_ID} TERM >/dev/null 2>&1
    start-stop-daemon --stop --quiet --oknodo --retry 10 --pidfile $PIDFILE ;;
  restart) $0 stop; $0 start ;;
  *) echo "usage: $0 start|stop|restart"; exit 1 ;;
esac
exit 0
"""

# Files of the VM bound into the container (as Docker does), destination → source.
GUEST_FILES = {
    "/etc/hosts": f"/{GUEST_BUNDLE}/hosts",
    "/etc/resolv.conf": "/etc/resolv.conf",
}

# Docker's default capabilities: images expect them (an entrypoint that chowns its
# data directory, then drops to a service user).
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]  # fmt: skip
OPEN_FILES = 1048576
HOSTS = "127.0.0.1\tlocalhost drafter\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def adapt_runtime_spec(spec: dict[str, Any]) -> None:
    """umoci's runtime config, changed to behave as under Docker and to fit the VM.

    The container shares the VM's network (no namespace of its own), so it answers on
    the guest address; it has no terminal; it sees its own ``/etc/hosts`` and the
    VM's ``/etc/resolv.conf``.
    """
    linux = spec.setdefault("linux", {})
    linux["namespaces"] = [ns for ns in linux.get("namespaces", []) if ns.get("type") != "network"]
    process = spec.setdefault("process", {})
    process["terminal"] = False
    process.pop("consoleSize", None)
    root_user = process.get("user", {}).get("uid", 0) == 0
    granted = DEFAULT_CAPABILITIES if root_user else []
    process["capabilities"] = {
        "bounding": DEFAULT_CAPABILITIES,
        "effective": granted,
        "permitted": granted,
        "inheritable": [],
        "ambient": [],
    }
    process["noNewPrivileges"] = False
    limits = [r for r in process.get("rlimits", []) if r.get("type") != "RLIMIT_NOFILE"]
    process["rlimits"] = [
        *limits,
        {"type": "RLIMIT_NOFILE", "hard": OPEN_FILES, "soft": OPEN_FILES},
    ]
    spec["hostname"] = "drafter"
    spec.setdefault("root", {})["readonly"] = False
    mounts = [m for m in spec.get("mounts", []) if m.get("destination") not in GUEST_FILES]
    for destination, source in GUEST_FILES.items():
        mounts.append({
            "destination": destination, "type": "bind", "source": source,
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
        })  # fmt: skip
    spec["mounts"] = mounts


def liveness_args(ready_port: int) -> str:
    """Arguments of drafter-liveness: the container runs (and the port answers)."""
    args = f"--wait-container {CONTAINER_ID}"
    if ready_port:
        args += f" --wait-tcp {ready_port}"
    return args
