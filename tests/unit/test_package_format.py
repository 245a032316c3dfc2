"""The .drft format without any command: its layout on disk, and the config checks a
package and a server's answer share. Bad packages given to the commands:
tests/vm/test_package.py."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from drafter.errors import DrafterError
from drafter.index import INDEX_MEMBER, PACK_MEMBER
from drafter.package import ALIGN, RESOURCES, PackageConfig, member_name, open_package
from support.packages import MIB, small_package


def test_package_is_a_plain_aligned_sparse_tar(workdir: Path) -> None:
    pkg = small_package(workdir, memory_mib=64)
    with tarfile.open(pkg) as tar:
        names = tar.getnames()
        assert names == [INDEX_MEMBER] + [member_name(r) for r in RESOURCES] + [PACK_MEMBER]
        for info in tar:
            assert info.offset_data % ALIGN == 0
        memory = tar.extractfile(member_name("memory"))
        assert memory is not None
        data = memory.read()
    assert data.startswith(b"memory") and data.endswith(b"last!")
    assert len(data) == 64 * MIB
    # Two 64 MiB resources that are mostly holes take little space on disk.
    assert os.stat(pkg).st_blocks * 512 < 4 * MIB
    opened = open_package(pkg)
    assert opened.config.memory_mib == 64
    assert opened.read("disk").endswith(b"last!")


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"cpus": 3.0}, "cpus must be"),
        ({"memory_mib": None}, "memory_mib must be"),
        ({"mac": "02:00:00:00:00:01\n"}, "mac must be"),
        ({"boot_args": "a\0b"}, "boot_args must be"),
        ({"sizes": {"disk": -1}}, "sizes must map"),
        ({"sizes": {"../x": 1}}, "sizes must map"),
    ],
)
def test_config_from_the_network_is_checked_the_same_way(fields: dict, error: str) -> None:
    """A peer parses the config a server sends with the same checks as a package's."""
    raw = json.loads(PackageConfig(1, 1, "", "02:00:00:00:00:01").to_json())
    raw.update(fields)
    with pytest.raises(DrafterError) as e:
        PackageConfig.from_json(json.dumps(raw).encode(), "10.0.0.2:1337")
    message = str(e.value)
    assert message.startswith("10.0.0.2:1337: ") and error in message, message
    assert "\n" not in message
