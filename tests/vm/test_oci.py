"""Container images as VMs: ``drafter-blueprint --oci-image`` end to end.

The images are built here (``oci_images``) and kept across sessions; each blueprint
and package is made once per session through the content cache, as for Redis.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from drafter.blueprint import container, oci
from drafter.blueprint.builder import Blueprint
from drafter.devicefs import unmount_stale_under
from drafter.errors import DrafterError
from drafter.package import open_package
from support.common import CACHE, OUT, TMP_PREFIX, assert_one_line_error, run_command
from support.net import free_port
from support.oci_images import (
    HTTP_PORT,
    Claimed,
    Symlink,
    busybox_image,
    copy_layout,
    craft_layout,
    redis_image,
    umoci,
)
from support.vms import (
    check_no_loss,
    copy_package,
    ctrl_c,
    finish_source,
    migrate,
    registry,
    runner,
    wait_for_redis,
    wait_resumed,
    writing,
)

IMAGES = OUT / "test" / "oci-images"
GUEST_ROOTFS = f"/{container.GUEST_BUNDLE}/rootfs"
# The busybox blueprint's flags: they override the image's command and one variable.
BUSYBOX_FLAGS = ["--oci-cmd", "flag-arg", "--oci-env", "GREETING=from-flag",
                 "--oci-ready-port", str(HTTP_PORT)]  # fmt: skip


def blueprint(ref: str, out_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_command(
        "drafter-blueprint", "--oci-image", ref, *flags,
        "--output-dir", str(out_dir), "--cache-dir", str(CACHE),
    )  # fmt: skip


def package(bp: Blueprint, netns: str, path: Path) -> Path:
    result = run_command(
        "drafter-packager",
        "--netns", netns,
        "--memory-size", "256",
        "--kernel-path", str(bp.kernel),
        "--initramfs-path", str(bp.initramfs),
        "--disk-path", str(bp.disk),
        "--package-output-path", str(path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="session")
def busybox_layout() -> Path:
    return busybox_image(IMAGES)


@pytest.fixture(scope="session")
def busybox_blueprint(busybox_layout: Path) -> Blueprint:
    out = OUT / "test" / "blueprint-oci-busybox"
    result = blueprint(f"{busybox_layout}:bb", out, *BUSYBOX_FLAGS)
    assert result.returncode == 0, result.stderr
    return Blueprint.at(out)


@pytest.fixture(scope="session")
def redis_oci_package(network) -> Path:
    out = OUT / "test" / "blueprint-oci-redis"
    result = blueprint(f"{redis_image(IMAGES)}:redis", out, "--oci-ready-port", "6379")
    assert result.returncode == 0, result.stderr
    return package(Blueprint.at(out), network.name(0), OUT / "test" / "oci-redis.drft")


@pytest.fixture(scope="module")
def busybox_vm(busybox_blueprint, network) -> Iterator[str]:
    """The busybox container running in a VM (never written back); its address."""
    directory = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "oci-"))
    try:
        path = package(busybox_blueprint, network.name(0), directory / "busybox.drft")
        with runner(path, network.name(1), "--persist=false") as proc:
            assert proc.stdout is not None
            assert "resumed" in proc.stdout.readline()
            yield network.info(1).external_address
            ctrl_c(proc)
    finally:
        unmount_stale_under(directory)
        shutil.rmtree(directory, ignore_errors=True)


def http_get(address: str, path: str, timeout: float = 30) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}:{HTTP_PORT}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def debugfs(image: Path, request: str) -> str:
    p = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True)
    return p.stdout + p.stderr


def disk_of(package_path: Path, dst: Path) -> Path:
    """The package's disk as a file, its ext4 journal replayed (as the guest left it)."""
    source = open_package(package_path).range("disk")
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, source.size)
        source.copy_to(fd, 0)
    finally:
        os.close(fd)
    subprocess.run(["e2fsck", "-fy", str(dst)], capture_output=True)  # exit 1: fixed
    return dst


# ------------------------------------------------------------------ Redis in a container


def test_redis_image_data_survives_runner_rounds_on_the_vm_disk(
    redis_oci_package, network, workdir
) -> None:
    path = copy_package(redis_oci_package, workdir)
    address = network.info(1).external_address
    with runner(path, network.name(1)) as proc:
        assert wait_for_redis(address).set("written", "before Ctrl-C")
        ctrl_c(proc)
    with runner(path, network.name(1)) as proc:
        client = wait_for_redis(address)
        assert client.get("written") == b"before Ctrl-C"
        assert client.set("second", "round")
        time.sleep(2)  # appendfsync everysec: the append-only file reaches the disk
        ctrl_c(proc)
    # The container's writes are files on the VM's disk, inside the package.
    disk = disk_of(path, workdir / "disk")
    data = f"{GUEST_ROOTFS}/data/appendonlydir"
    listing = debugfs(disk, f"ls {data}")
    incr = next(w for w in listing.split() if w.endswith(".incr.aof"))
    aof = debugfs(disk, f"cat {data}/{incr}")
    assert "before Ctrl-C" in aof and "round" in aof, aof[-300:]


def test_redis_image_from_a_registry_migrates_under_writes(
    redis_oci_package, network, workdir
) -> None:
    addresses = [network.info(2).external_address, network.info(3).external_address]
    with registry(redis_oci_package) as (_, raddr), contextlib.ExitStack() as stack:
        port = free_port()
        source = stack.enter_context(migrate(raddr, network.name(2), workdir, f"127.0.0.1:{port}"))
        wait_resumed(source)
        wait_for_redis(addresses[0]).delete("log")
        with writing(addresses) as writer:
            time.sleep(1)
            dest = stack.enter_context(migrate(f"127.0.0.1:{port}", network.name(3), workdir, ""))
            wait_resumed(dest)
            finish_source(source)
            time.sleep(1)
        assert writer.errors < 1000
        check_no_loss(addresses[1], writer)
        dest.send_signal(signal.SIGINT)
        dest.communicate(timeout=60)
        assert dest.returncode == 0


# ------------------------------------------------------ layers, whiteouts, environment


def test_layers_apply_in_order_with_whiteouts(busybox_blueprint, busybox_vm) -> None:
    assert http_get(busybox_vm, "/kept") == (200, "kept, from layer 2\n")
    assert http_get(busybox_vm, "/doomed")[0] == 404  # layer 3's whiteout
    report = http_get(busybox_vm, "/env")[1]
    assert "LS=env kept " in report
    assert "OPQ=new\n" in report  # layer 4's opaque directory hides layer 1's "old"
    # Neither the file nor a whiteout marker is on the disk.
    listing = debugfs(busybox_blueprint.disk, f"ls {GUEST_ROOTFS}/www")
    assert "kept" in listing and "doomed" not in listing and ".wh." not in listing


def test_entrypoint_sees_the_image_config_and_the_flags(busybox_vm) -> None:
    status, body = http_get(busybox_vm, "/env")
    assert status == 200
    seen = dict(line.split("=", 1) for line in body.splitlines())
    assert seen["GREETING"] == "from-flag"  # --oci-env replaces the image's value
    assert seen["IMAGE_VAR"] == "from-image"
    assert seen["ARG0"] == "flag-arg"  # --oci-cmd after the image's entrypoint
    assert seen["PWD"] == "/www"
    assert seen["UID"] == "1000"
    assert "localhost" in seen["HOSTS"]  # the container's own /etc/hosts


def test_docker_save_and_oci_archive_give_the_same_blueprint(
    busybox_layout, busybox_blueprint, workdir
) -> None:
    want = hashlib.sha256(busybox_blueprint.disk.read_bytes()).hexdigest()
    forms = {
        "docker.tar": ("docker-archive", "drafter/bb:1", "drafter/bb:1"),
        "oci.tar": ("oci-archive", "bb", "bb"),
    }
    for name, (transport, dest_tag, ref_tag) in forms.items():
        tar = workdir / name
        subprocess.run(
            ["skopeo", "copy", "--quiet", f"oci:{busybox_layout}:bb",
             f"{transport}:{tar}:{dest_tag}"],
            check=True, capture_output=True,
        )  # fmt: skip
        for ref in (str(tar), f"{tar}:{ref_tag}"):
            result = blueprint(ref, workdir / "bp", *BUSYBOX_FLAGS)
            assert result.returncode == 0, result.stderr
            assert "container bundle (cached)" in result.stderr, result.stderr
            assert (
                hashlib.sha256((workdir / "bp" / "drafter.drftdisk").read_bytes()).hexdigest()
                == want
            )


def test_disk_size_follows_the_image_unless_given(
    busybox_layout, busybox_blueprint, redis_oci_package, workdir
) -> None:
    busybox = busybox_blueprint.disk.stat().st_size
    redis = (OUT / "test" / "blueprint-oci-redis" / "drafter.drftdisk").stat().st_size
    assert redis > busybox + (150 << 20)  # the Redis image's root holds about 140 MiB more
    result = blueprint(f"{busybox_layout}:bb", workdir / "bp", "--disk-size", "700M")
    assert result.returncode == 0, result.stderr
    assert (workdir / "bp" / "drafter.drftdisk").stat().st_size == 700 << 20


# --------------------------------------------------------------------------- bad input


def arm64_image(layout: Path, workdir: Path) -> str:
    copy = copy_layout(layout, workdir / "arm64")
    umoci("config", "--image", f"{copy}:bb", "--architecture", "arm64")
    return f"{copy}:bb"


def corrupt_blob(layout: Path, workdir: Path) -> str:
    copy = copy_layout(layout, workdir / "corrupt")
    index = json.loads((copy / "index.json").read_text())
    manifest_blob = copy / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]
    layer = json.loads(manifest_blob.read_text())["layers"][0]["digest"].split(":")[1]
    with (copy / "blobs/sha256" / layer).open("r+b") as f:
        f.seek(100)
        f.write(b"garbage")
    return f"{copy}:bb"


def not_a_layout(workdir: Path) -> str:
    (workdir / "plain").mkdir()
    return str(workdir / "plain")


def garbled_index(layout: Path, workdir: Path) -> str:
    copy = copy_layout(layout, workdir / "garbled")
    (copy / "index.json").write_text("{not json")
    return str(copy)


def junk_file(workdir: Path) -> str:
    (workdir / "junk.tar").write_bytes(os.urandom(4096))
    return str(workdir / "junk.tar")


def two_tags(layout: Path, workdir: Path) -> str:
    copy = copy_layout(layout, workdir / "two")
    umoci("tag", "--image", f"{copy}:bb", "other")
    return str(copy)


BAD_IMAGES = {
    "missing": (lambda layout, w: str(w / "nosuch"), "does not exist"),
    "not a layout": (lambda layout, w: not_a_layout(w), "not an OCI image layout"),
    "garbled index": (garbled_index, "not valid JSON"),
    "junk file": (lambda layout, w: junk_file(w), "not a container image"),
    "unknown tag": (lambda layout, w: f"{layout}:nosuch", "has no tag 'nosuch'"),
    "corrupt blob": (corrupt_blob, "cannot read OCI image"),
    "other architecture": (arm64_image, "linux/arm64"),
    "several images, no tag": (two_tags, "holds 2 images"),
    "multi-arch without amd64": (
        lambda layout, w: str(craft_layout(w / "m", [("a", b"")], arch="arm64", multi_arch=True)),
        "has no linux/amd64 variant",
    ),
    "path escapes": (
        lambda layout, w: str(craft_layout(w / "e", [("../escape", b"x")])),
        "path outside the root: ../escape",
    ),
    "nested path escapes": (
        lambda layout, w: str(craft_layout(w / "e", [("etc/../../../x", b"x")])),
        "path outside the root",
    ),
    "whiteout escapes": (
        lambda layout, w: str(craft_layout(w / "e", [("../.wh.etc", b"")])),
        "path outside the root: ../.wh.etc",
    ),
    "no command": (
        lambda layout, w: str(craft_layout(w / "e", [("etc/x", b"")], cmd=None)),
        "no entrypoint or command",
    ),
    "malformed whiteout": (
        lambda layout, w: str(craft_layout(w / "e", [("etc/.wh.", b"")])),
        "malformed whiteout",
    ),
    "whiteout of the directory itself": (
        lambda layout, w: str(craft_layout(w / "e", [("etc/.wh..", b"")])),
        "whiteout of '.'",
    ),
    "whiteout of the parent": (
        lambda layout, w: str(craft_layout(w / "e", [("etc/.wh...", b"")])),
        "whiteout of '..'",
    ),
    "a layer that unpacks to 5 GiB": (  # refused from its header, nothing written
        lambda layout, w: str(craft_layout(w / "e", [("etc/x", b""), ("big", Claimed(5 << 30))])),
        "unpack to more than 4096 MiB",
    ),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_gets_one_line(busybox_layout, workdir: Path, case: str) -> None:
    make, needle = BAD_IMAGES[case]
    ref = make(busybox_layout, workdir)
    start = time.monotonic()
    result = blueprint(ref, workdir / "bp")
    assert_one_line_error(result, needle)
    assert not (workdir / "bp").exists()
    assert time.monotonic() - start < 30  # refused before anything is built


def test_a_path_through_a_symlink_stays_inside_the_root(workdir: Path) -> None:
    """Legal in a layer, and resolved inside the container's root (umoci's securejoin)."""
    outside = Path(f"/tmp/drafter-test-escape-{os.getpid()}")
    layout = craft_layout(
        workdir / "e",
        [("link", Symlink(f"../../../../../../..{outside}")), ("link/evil", b"x")],
    )
    # Unpacked here, not through the blueprint cache, so that umoci runs every time.
    image = oci.import_image(oci.resolve(str(layout)), workdir / "copy")
    oci.check_layers(image)
    oci.unpack(image, oci.OciOptions(str(layout)), workdir / "bundle")
    assert not outside.exists()
    assert (workdir / "bundle" / "rootfs" / str(outside).lstrip("/") / "evil").read_bytes() == b"x"


@pytest.mark.parametrize(
    "flags",
    [["--oci-max-size", "1M"], ["--disk-size", "1M"]],
)
def test_an_image_past_the_size_asked_for_is_refused_before_it_unpacks(
    workdir: Path, flags: list[str]
) -> None:
    layout = craft_layout(workdir / "e", [("etc/a", b"a" * (600 << 10)), ("b", b"b" * (600 << 10))])
    result = blueprint(str(layout), workdir / "bp", *flags)
    assert_one_line_error(result, "unpack to more than 1 MiB", "at b")
    assert not (workdir / "bp").exists()


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--disk-size", "64M"], "too small"),
        (["--oci-max-size", "lots"], "bad size"),
        (["--oci-env", "NOEQUALS"], "KEY=VALUE"),
        (["--oci-ready-port", "70000"], "not a TCP port"),
        (["--oci-cmd", "[1, 2]"], "JSON array of strings"),
        (["--app", "redis"], "exclude each other"),
    ],
)
def test_bad_flags_get_one_line(
    busybox_layout, busybox_blueprint, workdir: Path, flags: list[str], needle: str
) -> None:
    result = blueprint(f"{busybox_layout}:bb", workdir / "bp", *flags)
    assert_one_line_error(result, needle)
    assert not (workdir / "bp" / "drafter.drftdisk").exists()


def test_oci_flags_need_an_image() -> None:
    result = run_command("drafter-blueprint", "--oci-cmd", "x")
    assert_one_line_error(result, "--oci-cmd needs --oci-image")


# ------------------------------------------- helpers over an image (others: tests/unit/)


def test_reference_parsing(busybox_layout: Path) -> None:
    assert oci.resolve(f"{busybox_layout}:bb").tag == "bb"
    assert oci.resolve(str(busybox_layout)).tag == ""  # the only image
    assert oci._docker_name("docker.io/library/redis") == "redis:latest"
    assert oci._docker_name("docker.io/drafter/bb:1") == "drafter/bb:1"
    assert oci._docker_name("localhost:5000/app") == "localhost:5000/app:latest"
    assert oci.parse_args_list('["a", "b c"]', "--oci-cmd") == ["a", "b c"]
    assert oci.parse_args_list("a 'b c'", "--oci-cmd") == ["a", "b c"]
    with pytest.raises(DrafterError, match="JSON array"):
        oci.parse_args_list("[1", "--oci-cmd")
