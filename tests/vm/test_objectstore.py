"""Packages in object storage, with real servers: SeaweedFS's S3 gateway and nginx
(tests/support/objectstores.py). The packager, the runner and the peer write s3://
objects; peers start lazily from s3:// and https://, with no registry on the path;
the registry serves an s3:// package to a peer over the wire protocol."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from support.common import command
from support.vms import copy_package, ctrl_c, peer, registry, runner, wait_for_redis, wait_resumed

BUCKET = "drafter"


def with_store(seaweed, **changes: str | None) -> dict[str, str]:
    """This process's environment with the store's endpoint and credentials, changed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(seaweed.env())
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def summary(proc: subprocess.Popen[str]) -> str:
    """The peer's summary line, printed once every chunk is local."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("started from"):
            return line
    raise AssertionError("the peer ended without its summary: " + (proc.stderr.read() or ""))


def mib(line: str, what: str) -> float:
    found = re.search(r"([\d.]+) MiB " + what, line)
    return float(found.group(1)) if found else 0.0


def stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Ctrl-C a peer, which must exit 0: the rest of its stdout and its stderr."""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return out, err


@pytest.fixture(scope="module")
def s3_package(redis_blueprint, network, seaweed) -> str:
    """The Redis VM packaged by drafter-packager straight into the store."""
    url = f"s3://{BUCKET}/redis.drft"
    result = subprocess.run(
        [command("drafter-packager"), "--netns", network.name(0), "--memory-size", "256",
         "--kernel-path", str(redis_blueprint.kernel),
         "--initramfs-path", str(redis_blueprint.initramfs),
         "--disk-path", str(redis_blueprint.disk),
         "--package-output-path", url, "--if-absent"],
        capture_output=True, text=True, env=with_store(seaweed), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "index" in result.stdout.lower(), result.stdout
    return url


def test_a_peer_starts_lazily_from_s3_and_registry_serves_it_too(
    s3_package, seaweed, network, workdir
) -> None:
    env = with_store(seaweed)
    with peer(s3_package, network.name(1), workdir, env=env) as p:
        line = wait_resumed(p)
        assert s3_package in line
        client = wait_for_redis(network.info(1).external_address)
        assert client.ping()
        assert client.set("from", "s3")
        done = summary(p)
        # Lazily: zero chunks are never fetched; the VM is 256 MiB of memory.
        assert 0 < mib(done, "on the wire") < 256 + 200, done
        stop(p)
    # The same object through drafter-registry, for clients of the wire protocol.
    with registry(s3_package, env=env) as (_, raddr), peer(raddr, network.name(2), workdir) as p:
        wait_resumed(p)
        client = wait_for_redis(network.info(2).external_address)
        assert client.ping() and client.get("from") is None  # the package, not that write
        stop(p)


def test_a_peer_starts_from_https_behind_nginx_with_a_test_ca(
    seeded_package, nginx_factory, network, workdir
) -> None:
    served_dir = workdir / "www"
    served_dir.mkdir()
    copy_package(seeded_package, served_dir)
    nginx = nginx_factory(served_dir, tls=True)
    url = f"{nginx.url}{seeded_package.name}"
    without_ca = subprocess.run(
        [command("drafter-peer"), "--netns", network.name(1), "--raddr", url,
         "--work-dir", str(workdir / "vms")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert without_ca.returncode != 0
    assert "Traceback" not in without_ca.stderr
    assert len(without_ca.stderr.strip().splitlines()) == 1, without_ca.stderr
    with peer(url, network.name(1), workdir, "--tls-ca", str(nginx.ca_pem)) as p:
        wait_resumed(p)
        client = wait_for_redis(network.info(1).external_address)
        assert client.get("from") == b"the package"
        stop(p)


def test_runner_writes_back_to_s3_and_peers_start_from_it_sharing_a_chunk_cache(
    seeded_package, seaweed, network, workdir
) -> None:
    package = copy_package(seeded_package, workdir)
    url = f"s3://{BUCKET}/written-by-runner.drft"
    env = with_store(seaweed)
    with runner(package, network.name(3), "--package-output-path", url, env=env) as proc:
        assert wait_for_redis(network.info(3).external_address).set("runner", "wrote this")
        ctrl_c(proc)
    cache = workdir / "chunk-cache"
    lines = []
    for n in (1, 2):
        with peer(url, network.name(n), workdir, "--chunk-cache", str(cache), env=env) as p:
            wait_resumed(p)
            client = wait_for_redis(network.info(n).external_address)
            assert client.get("runner") == b"wrote this"
            assert client.get("from") == b"the package"
            lines.append(summary(p))
            stop(p)
    first, second = lines
    assert mib(first, "on the wire") > 10, first
    # The first takes from the cache only chunks the package holds more than once.
    assert mib(first, "from the host's chunk cache") < mib(first, "on the wire") / 10, first
    # The second VM of the package on this host fetches only what the first one's VM
    # had not touched before (nothing: the first pulled everything).
    assert mib(second, "on the wire") < 1, second
    assert mib(second, "from the host's chunk cache") >= moved(second) - 1, second


def moved(line: str) -> float:
    """The MiB a summary line says the devices got (fetched or from the cache)."""
    devices = line.split(" moved ", 1)[1].split(";", 1)[0]
    return sum(float(x) for x in re.findall(r"([\d.]+) MiB", devices))


@pytest.mark.parametrize(
    "changes",
    [
        {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
        {"AWS_SKIP_SIGNATURE": "true"},  # unsigned requests
        {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
    ],
    ids=["wrong-secret", "unsigned", "no-credentials"],
)
def test_refused_credentials_are_one_line_naming_the_variables(
    changes, s3_package, seaweed, network, workdir
) -> None:
    result = subprocess.run(
        [command("drafter-peer"), "--netns", network.name(1), "--raddr", s3_package,
         "--work-dir", str(workdir / "vms"), "--retry-timeout", "3"],
        capture_output=True, text=True, timeout=120,
        env=with_store(seaweed, AWS_SHARED_CREDENTIALS_FILE="/nonexistent", **changes),
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "AWS_ACCESS_KEY_ID" in lines[0] and "AWS_SECRET_ACCESS_KEY" in lines[0]


def test_a_store_outage_after_the_resume_stalls_the_pull_and_the_vm_runs_on(
    seeded_package, nginx_factory, network, workdir
) -> None:
    served_dir = workdir / "www"
    served_dir.mkdir()
    copy_package(seeded_package, served_dir)
    nginx = nginx_factory(served_dir, rate="2m")  # per connection: the pull takes ~10 s
    url = f"{nginx.url}{seeded_package.name}"
    with peer(url, network.name(2), workdir, "--retry-timeout", "2") as p:
        wait_resumed(p)
        nginx.stop()  # mid-pull: the background pull has hardly begun
        time.sleep(8)  # well past the client's own 2 s of retries
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        nginx.restart()
        client = wait_for_redis(network.info(2).external_address)
        assert client.get("from") == b"the package"
        done = summary(p)
        assert mib(done, "on the wire") > 10, done
        assert client.set("after", "the outage")
        _, err = stop(p)
    assert "retrying" in err and "is back after" in err, err
    assert "Traceback" not in err
