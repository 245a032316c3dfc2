"""drafter-agent: answers the host's BeforeSuspend and AfterResume calls.

Protocol: one JSON object per line. The host sends
``{"id": 1, "call": "before_suspend"}`` or
``{"id": 2, "call": "after_resume", "time_ns": <host wall clock>}``; the agent answers
``{"id": 1, "ok": true}`` or ``{"id": 1, "ok": false, "error": "..."}``.
AfterResume first sets the guest clock to the host's time (it is stale after a
restore), then runs the user's command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from drafter.guest.channel import SerialChannel

AGENT_PORT = "drafter.agent"


def run_hook(shell: str, cmd: str) -> str | None:
    """Run a user hook; return an error message or None."""
    if not cmd:
        return None
    p = subprocess.run([shell, "-c", cmd], capture_output=True, text=True)
    if p.returncode != 0:
        return f"command exited with {p.returncode}: {p.stderr.strip()[-200:]}"
    return None


def handle(request: dict, args: argparse.Namespace) -> dict:
    call = request.get("call")
    reply: dict = {"id": request.get("id")}
    error: str | None
    if call == "before_suspend":
        error = run_hook(args.shell_cmd, args.before_suspend_cmd)
    elif call == "after_resume":
        error = None
        host_ns = request.get("time_ns")
        if isinstance(host_ns, int):
            try:
                time.clock_settime_ns(time.CLOCK_REALTIME, host_ns)
            except OSError as e:
                error = f"cannot set clock: {e}"
        error = error or run_hook(args.shell_cmd, args.after_resume_cmd)
    elif call == "ping":
        error = None
    else:
        error = f"unknown call {call!r}"
    reply["ok"] = error is None
    if error:
        reply["error"] = error
    return reply


def serve(args: argparse.Namespace) -> None:
    channel = SerialChannel(args.port_name, timeout=args.timeout)
    print(f"drafter-agent: serving on {channel.path}", flush=True)
    while True:
        line = channel.read_line()
        if not line:
            continue
        try:
            request = json.loads(line)
        except ValueError:
            channel.send_line(json.dumps({"id": None, "ok": False, "error": "bad request"}))
            continue
        channel.send_line(json.dumps(handle(request, args)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="drafter-agent", description=__doc__.splitlines()[0])
    p.add_argument("--port-name", default=AGENT_PORT, help="virtio-serial port to serve on")
    p.add_argument("--vsock-port", type=int, default=26, help="seed compatibility; unused")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the port")
    p.add_argument("--shell-cmd", default="sh", help="shell for the hook commands")
    p.add_argument("--before-suspend-cmd", default="", help="run before the VM is suspended")
    p.add_argument("--after-resume-cmd", default="", help="run after the VM has resumed")
    args = p.parse_args(argv)
    try:
        serve(args)
    except (TimeoutError, OSError) as e:
        print(f"drafter-agent: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
