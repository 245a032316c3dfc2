"""An OCI layout written by hand, read by drafter.blueprint.oci (skopeo, as any user).
Unpacking layers (umoci, as root), blueprints and VMs from images: tests/vm/test_oci.py."""

from __future__ import annotations

from pathlib import Path

from drafter.blueprint import oci
from support.oci_images import craft_layout


def test_multi_arch_image_uses_the_amd64_variant(workdir: Path) -> None:
    layout = craft_layout(workdir / "m", [("a", b"")], multi_arch=True)
    with oci.open_image(oci.OciOptions(f"{layout}:crafted"), workdir) as image:
        assert image.config["architecture"] == "amd64"
