"""The Minecraft app's recipe and flags (drafter-blueprint --app minecraft): versions
are checked against the pinned flying-squid and minecraft-data, bad input is one line,
and the trimming of minecraft-data keeps exactly what dataPaths.json names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from drafter.blueprint import minecraft
from drafter.blueprint.apps import RECIPES, minecraft_recipe
from drafter.blueprint.builder import BlueprintSpec
from drafter.errors import DrafterError
from support.common import assert_one_line_error, run_command


def test_the_default_recipe_serves_the_default_version_on_the_minecraft_port() -> None:
    recipe = BlueprintSpec(app="minecraft").recipe()
    assert recipe == RECIPES["minecraft"]
    assert recipe.packages == ["nodejs"]
    assert recipe.port == 25565 and recipe.service == "minecraft-server"
    assert '"version": "1.21.4"' in recipe.setup
    assert '"online-mode": false' in recipe.setup


def test_another_supported_version_changes_the_recipe() -> None:
    recipe = BlueprintSpec(app="minecraft", minecraft_version="1.20.5").recipe()
    assert '"version": "1.20.5"' in recipe.setup
    assert recipe != minecraft_recipe()


@pytest.mark.parametrize(
    "version, needle",
    [
        ("1.99", "unknown Minecraft version '1.99'"),
        ("banana", "unknown Minecraft version"),
        ("1.21.5", "Minecraft 1.21.5 is not supported by flying-squid"),  # data, no server
        ("1.7", "not supported by flying-squid"),
    ],
)
def test_versions_flying_squid_does_not_serve_are_refused(version: str, needle: str) -> None:
    with pytest.raises(minecraft.MinecraftError, match=needle):
        BlueprintSpec(app="minecraft", minecraft_version=version).recipe()


def test_every_supported_version_is_one_minecraft_data_knows() -> None:
    assert set(minecraft.SUPPORTED_VERSIONS) <= set(minecraft.known_versions())


def test_a_version_for_another_app_is_refused() -> None:
    with pytest.raises(DrafterError, match="--minecraft-version needs --app minecraft"):
        BlueprintSpec(app="redis", minecraft_version="1.21.4").recipe()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--app", "minecraft", "--minecraft-version", "1.99"], "unknown Minecraft version"),
        (["--app", "minecraft", "--minecraft-version", "1.21.5"], "not supported by flying"),
        (["--app", "redis", "--minecraft-version", "1.21.4"], "needs --app minecraft"),
    ],
)
def test_drafter_blueprint_refuses_bad_versions_in_one_line(argv: list[str], needle: str) -> None:
    """Before the root check and before anything is built."""
    result = run_command("drafter-blueprint", *argv)
    assert_one_line_error(result, needle)


def test_no_npm_on_the_host_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(minecraft.MinecraftError, match="needs npm and node on the host") as e:
        minecraft.find_npm()
    assert "\n" not in str(e.value)


def test_a_host_node_older_than_18_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, text in (("node", "echo v16.20.2"), ("npm", "echo 8.19.4")):
        (tmp_path / name).write_text(f"#!/bin/sh\n{text}\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + "/bin")
    with pytest.raises(minecraft.MinecraftError, match="needs node >= 18 on the host, not v16"):
        minecraft.find_npm()


def test_the_stage_key_follows_the_version() -> None:
    assert minecraft.stage_key("1.21.4") != minecraft.stage_key("1.20.5")
    assert minecraft.stage_key("1.21.4") == minecraft.stage_key("1.21.4")


def test_trimming_keeps_the_folders_data_paths_names(tmp_path: Path) -> None:
    package = tmp_path / "minecraft-data"
    data = package / "minecraft-data" / "data"
    paths = {"pc": {"1.21.4": {"blocks": "pc/1.21.4", "windows": "pc/1.16.1"},
                    "1.20": {"blocks": "pc/1.20"}},
             "bedrock": {"1.21.0": {"blocks": "bedrock/1.21.0"}}}  # fmt: skip
    data.mkdir(parents=True)
    (data / "dataPaths.json").write_text(json.dumps(paths))
    for folder in ("pc/1.21.4", "pc/1.16.1", "pc/1.20", "pc/common", "bedrock/1.21.0",
                   "bedrock/common"):  # fmt: skip
        (data / folder).mkdir(parents=True)
        (data / folder / "blocks.json").write_text("[]")
    (package / "minecraft-data" / "tools").mkdir()
    minecraft.trim_data(package, "1.21.4")
    left = sorted(str(p.relative_to(data)) for p in data.glob("*/*"))
    assert left == ["bedrock/common", "pc/1.16.1", "pc/1.21.4", "pc/common"]
    assert not (package / "minecraft-data" / "tools").exists()
    with pytest.raises(minecraft.MinecraftError, match="no data for Minecraft 1.19"):
        minecraft.trim_data(package, "1.19")
