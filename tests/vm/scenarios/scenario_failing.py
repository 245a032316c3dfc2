"""Not collected by default: test_cleanup.py runs it in an inner pytest session.

It starts a real VM (QEMU in a daemon-made namespace, with a FUSE-mounted package
in the runner case) and then fails, so the outer test can check that the fixtures
removed everything anyway.
"""

from __future__ import annotations

import asyncio

from drafter.vm import LocalVM


def test_fails_while_a_vm_runs(redis_blueprint, network, machine_factory) -> None:
    async def scenario() -> None:
        machine = machine_factory(redis_blueprint, netns=network.name(0))
        await machine.boot()
        raise AssertionError("failing on purpose while QEMU runs")

    asyncio.run(scenario())


def test_fails_while_a_package_is_mounted(redis_package, network, workdir) -> None:
    from support.vms import copy_package

    package = copy_package(redis_package, workdir)

    async def scenario() -> None:
        async with LocalVM(package, network.name(1), persist=False):
            raise AssertionError("failing on purpose while the runner's devices are mounted")

    asyncio.run(scenario())
