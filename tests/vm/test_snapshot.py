"""Boot, snapshot, restore in another namespace: the data and the clock survive."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pg8000.native
import redis

from drafter import snapshot


def redis_client(address: str) -> redis.Redis:
    return redis.Redis(host=address, port=6379, socket_timeout=10, socket_connect_timeout=10)


def test_redis_survives_snapshot_and_restore_in_another_namespace(
    redis_blueprint, network, machine_factory, workdir: Path
) -> None:
    async def scenario() -> None:
        first = machine_factory(redis_blueprint, netns=network.name(0))
        await snapshot.boot_to_liveness(first, timeout=240)
        before = redis_client(network.info(0).external_address)
        assert before.set("drafter:key", "value-before-snapshot")
        state = workdir / "state"
        await snapshot.suspend(first, state)
        await first.stop()
        assert first.process is not None and first.process.returncode is not None

        # Let the guest clock fall behind: the agent must set it on resume.
        await asyncio.sleep(4)
        second = machine_factory(
            redis_blueprint,
            netns=network.name(1),
            memory=first.config.memory,
            disk=first.config.disk,
        )
        await snapshot.resume(second, state)
        try:
            after = redis_client(network.info(1).external_address)
            assert after.get("drafter:key") == b"value-before-snapshot"
            seconds, micros = after.time()
            assert abs(seconds + micros / 1e6 - time.time()) < 2.0
            assert after.set("drafter:key2", "after-restore")
        finally:
            await second.stop()

    asyncio.run(scenario())


def test_postgresql_row_survives_snapshot_and_restore(
    postgresql_blueprint, network, machine_factory, workdir: Path
) -> None:
    async def scenario() -> None:
        first = machine_factory(postgresql_blueprint, netns=network.name(2), memory_mib=384)
        await snapshot.boot_to_liveness(first, timeout=300)
        db = pg8000.native.Connection("postgres", host=network.info(2).external_address)
        db.run("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        db.run("INSERT INTO notes VALUES (1, 'written before the snapshot')")
        db.close()
        state = workdir / "state"
        await snapshot.suspend(first, state)
        await first.stop()

        second = machine_factory(
            postgresql_blueprint,
            netns=network.name(3),
            memory_mib=384,
            memory=first.config.memory,
            disk=first.config.disk,
        )
        await snapshot.resume(second, state)
        try:
            db = pg8000.native.Connection("postgres", host=network.info(3).external_address)
            assert db.run("SELECT body FROM notes WHERE id = 1") == [
                ["written before the snapshot"]
            ]
            db.close()
        finally:
            await second.stop()

    asyncio.run(scenario())
