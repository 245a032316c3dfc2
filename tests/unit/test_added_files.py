"""drafter-blueprint --add-file HOST:GUEST and --ready-port: hostile specs are refused
in one line, the cache key follows the content, a link in the guest tree never leads a
write onto the host, and the stand-in jar the VM test uses really serves."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from drafter.blueprint import addfiles, disk
from drafter.blueprint.apps import RECIPES
from drafter.blueprint.builder import BlueprintSpec, rootfs_key
from drafter.errors import DrafterError
from support.common import ROOT, assert_one_line_error, run_command
from support.net import free_port
from support.standin_jar import GREETING, HOST_PROPERTY, PORT_PROPERTY, write_jar

root_only = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("busybox") is None, reason="chroot needs root"
)


@pytest.fixture
def jar(tmp_path: Path) -> Path:
    return write_jar(tmp_path / "server.jar")


@pytest.mark.parametrize(
    "guest, needle",
    [
        ("opt/server.jar", "must be absolute"),
        ("/opt/../etc/shadow", "without '.', '..' or '//'"),
        ("/opt//server.jar", "without '.', '..' or '//'"),
        ("/opt/./server.jar", "without '.', '..' or '//'"),
        ("/opt/", "without '.', '..' or '//'"),
        ("/", "without '.', '..' or '//'"),
        ("/proc/sys/kernel/core_pattern", "/proc is not kept on the VM's disk"),
        ("/dev/vda", "/dev is not kept"),
        ("/run/x", "/run is not kept"),
        ("/var/run/x.pid", "/var/run is not kept"),
    ],
)
def test_bad_guest_paths_are_refused(jar: Path, guest: str, needle: str) -> None:
    with pytest.raises(DrafterError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        addfiles.parse(f"{jar}:{guest}")


def test_bad_host_files_are_refused(tmp_path: Path, jar: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {
        "no-colon": "takes HOST_PATH:GUEST_PATH",
        f":{'/opt/x'}": "takes HOST_PATH:GUEST_PATH",
        f"{jar}:": "takes HOST_PATH:GUEST_PATH",
        f"{tmp_path / 'missing'}:/opt/x": "cannot read",
        f"{tmp_path}:/opt/x": "is not a regular file",
        f"{fifo}:/opt/x": "is not a regular file",  # refused at once, not waited on
        "/dev/zero:/opt/x": "is not a regular file",
    }
    for spec, needle in cases.items():
        with pytest.raises(DrafterError, match=needle) as e:
            addfiles.parse(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(DrafterError, match="/opt/x is given twice"):
        addfiles.parse_all([f"{jar}:/opt/x", f"{jar}:/opt/x"])


def test_the_command_refuses_bad_input_in_one_line(tmp_path: Path, jar: Path) -> None:
    def blueprint(*args: str) -> subprocess.CompletedProcess[str]:
        return run_command("drafter-blueprint", "--output-dir", str(tmp_path / "out"),
                           "--cache-dir", str(tmp_path / "cache"), *args)  # fmt: skip

    assert_one_line_error(blueprint("--app", "none", "--add-file", "/etc/passwd:etc"),
                          "must be absolute")  # fmt: skip
    assert_one_line_error(blueprint("--app", "none", "--add-file", f"{tmp_path}:/opt/x"),
                          "is not a regular file")  # fmt: skip
    assert_one_line_error(blueprint("--ready-port", "25565"), "--ready-port needs --app none")
    assert_one_line_error(blueprint("--app", "none", "--ready-port", "70000"), "1-65535")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_ready_port_makes_liveness_wait_for_it() -> None:
    assert BlueprintSpec(app="none").recipe().port == 0
    recipe = BlueprintSpec(app="none", ready_port=25565).recipe()
    assert recipe.port == 25565 and recipe.name == "none"
    assert RECIPES["none"].port == 0  # the shared recipe is not changed


def test_the_cache_key_follows_the_content_not_the_host_path(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"one")
    (tmp_path / "b").write_bytes(b"one")
    recipe = RECIPES["none"]

    def key(*specs: str) -> str:
        spec = BlueprintSpec(app="none", added_files=addfiles.parse_all(list(specs)))
        return rootfs_key(spec, recipe, None)

    same = key(f"{tmp_path / 'a'}:/opt/f")
    assert key(f"{tmp_path / 'b'}:/opt/f") == same
    assert key(f"{tmp_path / 'a'}:/opt/g") != same
    assert key() != same
    (tmp_path / "b").write_bytes(b"two")
    assert key(f"{tmp_path / 'b'}:/opt/f") != same
    (tmp_path / "a").chmod(0o755)
    assert key(f"{tmp_path / 'a'}:/opt/f") != same


def busybox_tree(tree: Path) -> Path:
    """The least of a guest tree the install needs: a static busybox as /bin/sh & co."""
    (tree / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "", tree / "bin" / "busybox")
    for tool in ("sh", "mkdir", "dirname", "rm", "cat", "chmod", "mv"):  # busybox mv has -T
        (tree / "bin" / tool).symlink_to("busybox")
    return tree


@root_only
def test_install_writes_inside_the_tree_whatever_links_it_holds(tmp_path: Path) -> None:
    tree = busybox_tree(tmp_path / "tree")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "server.jar").write_bytes(b"precious")
    # Links planted in the tree that would lead a host-side write out of it.
    (tree / "opt").symlink_to(victim)  # absolute: a host path, if resolved on the host
    (tree / "etc").mkdir()
    (tree / "etc" / "app.conf").symlink_to(victim / "server.jar")
    source = tmp_path / "server.jar"
    source.write_bytes(b"the user's jar")
    source.chmod(0o4755)
    conf = tmp_path / "app.conf"
    conf.write_bytes(b"setting=1\n")
    conf.chmod(0o600)
    files = addfiles.parse_all([f"{source}:/opt/minecraft/server.jar", f"{conf}:/etc/app.conf"])
    # /opt leads nowhere inside the tree: refused, and nothing written on the host.
    with pytest.raises(DrafterError, match="cannot write /opt/minecraft/server.jar"):
        addfiles.install(tree, files)
    assert sorted(p.name for p in victim.iterdir()) == ["server.jar"]
    # Where the link's target exists inside the tree, the file goes there.
    (tree / str(victim).lstrip("/")).mkdir(parents=True)
    addfiles.install(tree, files)
    assert (victim / "server.jar").read_bytes() == b"precious"
    assert sorted(p.name for p in victim.iterdir()) == ["server.jar"]
    # /opt resolved inside the tree: to the tree's own copy of the victim's path.
    placed = tree / str(victim).lstrip("/") / "minecraft" / "server.jar"
    assert placed.read_bytes() == b"the user's jar"
    assert placed.stat().st_mode & 0o7777 == 0o755  # no set-id bit
    etc = tree / "etc" / "app.conf"
    assert not etc.is_symlink() and etc.read_bytes() == b"setting=1\n"
    assert etc.stat().st_mode & 0o777 == 0o600
    assert not list(tree.rglob("*.drafter-add"))


@root_only
def test_a_directory_or_a_file_in_the_way_fails_the_install_in_one_line(tmp_path: Path) -> None:
    tree = busybox_tree(tmp_path / "tree")
    (tree / "srv" / "data").mkdir(parents=True)  # a directory where the file should go
    (tree / "etc").mkdir()
    (tree / "etc" / "conf").write_text("a file, not a directory")
    small = tmp_path / "small"
    small.write_bytes(b"x" * 100)  # small: it fits in the pipe before the shell fails
    for guest, needle in (("/srv/data", "cannot write /srv/data"),
                          ("/etc/conf/app", "cannot write /etc/conf/app")):  # fmt: skip
        with pytest.raises(DrafterError, match=needle) as e:
            addfiles.install(tree, addfiles.parse_all([f"{small}:{guest}"]))
        assert "\n" not in str(e.value) and "Broken pipe" not in str(e.value)
    assert list((tree / "srv" / "data").iterdir()) == []


@root_only
def test_a_file_changed_after_hashing_is_refused(tmp_path: Path) -> None:
    tree = busybox_tree(tmp_path / "tree")
    source = tmp_path / "data"
    source.write_bytes(b"first")
    files = addfiles.parse_all([f"{source}:/srv/data"])
    source.write_bytes(b"second")
    with pytest.raises(DrafterError, match="changed while the blueprint was built"):
        addfiles.install(tree, files)


@pytest.mark.skipif(shutil.which("java") is None, reason="no java on this host")
def test_the_stand_in_jar_serves_and_counts(jar: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(["java", f"-D{PORT_PROPERTY}={port}", f"-D{HOST_PROPERTY}=127.0.0.1",
                             "-jar", str(jar), "nogui"],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        lines = []
        while len(lines) < 2:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    lines.append(s.makefile().readline())
            except ConnectionRefusedError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert lines == [f"{GREETING}1\n", f"{GREETING}2\n"]
        # Clients that leave at once (the guest's liveness probe does) do not stop it.
        for _ in range(20):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.makefile().readline() == f"{GREETING}23\n"
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert write_jar(jar.parent / "again.jar").read_bytes() == jar.read_bytes()
    assert (ROOT / "docs" / "recipes" / "minecraft-server-jar.sh").is_file()


def test_a_failed_install_names_the_package_not_mmdebstrap() -> None:
    # mmdebstrap's output when openjdk's post-installation script failed (seen here
    # before the man1 hook); the last line says nothing.
    stderr = """Setting up openjdk-17-jre-headless:amd64 (17.0.21.1+2-1~deb12u1) ...
update-alternatives: error: error creating symbolic link '/usr/share/man/man1/java.1.gz.dpkg-tmp': No such file or directory
dpkg: error processing package openjdk-17-jre-headless:amd64 (--configure):
 installed openjdk-17-jre-headless:amd64 package post-installation script subprocess returned error exit status 2
Errors were encountered while processing:
 openjdk-17-jre-headless:amd64
E: Sub-process env returned an error code (1)
E: setup failed: E: apt-get ... failed
E: mmdebstrap failed to run
"""  # noqa: E501
    assert disk.mmdebstrap_reason(stderr) == (
        "dpkg: error processing package openjdk-17-jre-headless:amd64 (--configure):"
    )
    missing = "E: Unable to locate package no-such-package\nE: mmdebstrap failed to run\n"
    assert disk.mmdebstrap_reason(missing) == "E: Unable to locate package no-such-package"
    assert disk.mmdebstrap_reason("E: some reason\nE: mmdebstrap failed to run") == (
        "E: some reason"
    )
    assert disk.mmdebstrap_reason("") == "no output"
