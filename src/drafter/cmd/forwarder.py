"""drafter-forwarder: forward TCP ports on the host to VMs in drafter-daemon namespaces."""

from __future__ import annotations

import asyncio
import logging
import signal

from drafter import cli
from drafter.network.forwarder import (
    DEFAULT_PORT_FORWARDS,
    Forwarder,
    PortForward,
    parse_port_forwards,
)
from drafter.network.state import DEFAULT_STATE_DIR

PROG = "drafter-forwarder"
log = logging.getLogger(__name__)


async def _run(forwards: list[PortForward], state_dir: str) -> None:
    fwd = Forwarder(forwards, state_dir)
    await fwd.start()
    for f, addr in zip(forwards, fwd.addresses, strict=True):
        print(f"{addr} -> {f.netns} port {f.internal_port}/{f.protocol}", flush=True)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    if main_task is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, main_task.cancel)
    try:
        await fwd.serve_forever()
    except asyncio.CancelledError:
        log.debug("stopping")


def main(argv: list[str] | None = None) -> int:
    """Entry point of drafter-forwarder."""
    p = cli.parser(PROG, "Forward TCP ports on the host to VMs in drafter network namespaces.")
    p.add_argument(
        "--port-forwards",
        default=DEFAULT_PORT_FORWARDS,
        help="JSON list of {netns, internalPort, protocol, externalAddr}",
    )
    p.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR, help="state directory of drafter-daemon"
    )
    a = p.parse_args(argv)
    cli.setup_logging(a.verbose)

    def body() -> int:
        forwards = parse_port_forwards(a.port_forwards)
        asyncio.run(_run(forwards, a.state_dir))
        return 0

    return cli.run(PROG, body)
