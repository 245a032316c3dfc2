"""drafter-liveness: tells the host that the guest's application is up.

It waits until the container of an OCI blueprint runs and the application's TCP port
accepts connections (each when given), then sends ``ready`` on the liveness port
until the host answers ``ack``.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

from drafter.guest.channel import SerialChannel

LIVENESS_PORT = "drafter.liveness"


def wait_for_tcp(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port}") from None
            time.sleep(0.2)


def wait_for_container(container: str, runtime: str, timeout: float) -> None:
    """Until the OCI runtime reports the container as running."""
    deadline = time.monotonic() + timeout
    status = "absent"
    while time.monotonic() < deadline:
        p = subprocess.run([runtime, "state", container], capture_output=True, text=True)
        if p.returncode == 0:
            try:
                status = json.loads(p.stdout).get("status", "unknown")
            except json.JSONDecodeError:
                status = "unknown"
            if status == "running":
                return
        time.sleep(0.2)
    raise TimeoutError(f"container {container} is not running (last status: {status})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="drafter-liveness", description=__doc__.splitlines()[0])
    p.add_argument("--port-name", default=LIVENESS_PORT, help="virtio-serial port to signal on")
    p.add_argument("--vsock-port", type=int, default=25, help="seed compatibility; unused")
    p.add_argument("--wait-tcp", type=int, default=0, help="wait for this local TCP port first")
    p.add_argument("--wait-container", default="", help="wait until this container runs first")
    p.add_argument("--oci-runtime", default="crun", help="OCI runtime that runs the container")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait in all")
    args = p.parse_args(argv)
    try:
        if args.wait_container:
            wait_for_container(args.wait_container, args.oci_runtime, args.timeout)
        if args.wait_tcp:
            wait_for_tcp(args.wait_tcp, args.timeout)
        channel = SerialChannel(args.port_name, timeout=args.timeout)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            channel.send_line("ready")
            if channel.read_line(timeout=1.0) == "ack":
                print("drafter-liveness: host acknowledged", flush=True)
                return 0
        raise TimeoutError("host never acknowledged")
    except (TimeoutError, OSError) as e:
        print(f"drafter-liveness: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
