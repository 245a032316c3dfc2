"""The Minecraft app: flying-squid (a Minecraft Java server in Node.js) in the guest.

The server comes from the npm registry at blueprint time, through the host's npm, at
the exact versions of the package-lock.json beside this file; nothing is downloaded
when the VM runs. ``minecraft-data`` ships every Java and Bedrock version (about
500 MB); the guest keeps only the folders ``data/dataPaths.json`` names for the chosen
version, plus the common tables minecraft-data reads when it loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from drafter.errors import DrafterError

DEFAULT_VERSION = "1.21.4"
PORT = 25565
SERVICE = "minecraft-server"
GUEST_DIR = "opt/minecraft"  # the server and its node_modules, in the guest
WORLD_DIR = "/var/lib/minecraft"  # the world, on the VM's disk
FLYING_SQUID = "flying-squid"
# The versions flying-squid 1.12.0 (the lock's) is tested with (its src/lib/version.js);
# stage() checks the installed copy still says so.
SUPPORTED_VERSIONS = (
    "1.8.8", "1.9.4", "1.10.2", "1.11.2", "1.12.2", "1.13.2", "1.14.4", "1.15.2",
    "1.16.5", "1.17.1", "1.18", "1.18.2", "1.19", "1.19.2", "1.19.3", "1.19.4", "1.20",
    "1.20.2", "1.20.3", "1.20.5", "1.21.1", "1.21.3", "1.21.4",
)  # fmt: skip
NPM_FLAGS = ["--no-fund", "--no-audit", "--no-update-notifier"]
MIN_NPM_NODE = 18  # the host's node that runs npm


class MinecraftError(DrafterError):
    """The Minecraft app cannot be built as asked."""


def _files() -> resources.abc.Traversable:
    return resources.files(__name__)


def known_versions() -> list[str]:
    """Every Minecraft Java version the lock's minecraft-data names (pc/common:
    versions.json and protocolVersions.json, snapshots included)."""
    return _files().joinpath("java-versions.txt").read_text().split()


def check_version(version: str) -> str:
    """``version`` if flying-squid serves it; MinecraftError (one line) if not."""
    if version in SUPPORTED_VERSIONS:
        return version
    if version not in known_versions():
        raise MinecraftError(
            f"unknown Minecraft version {version!r} (flying-squid serves "
            f"{SUPPORTED_VERSIONS[0]} to {SUPPORTED_VERSIONS[-1]})"
        )
    raise MinecraftError(
        f"Minecraft {version} is not supported by flying-squid (choose one of "
        f"{', '.join(SUPPORTED_VERSIONS)})"
    )


def settings(version: str) -> dict[str, object]:
    """flying-squid's settings: offline mode, a superflat world kept on the disk."""
    return {
        "motd": "drafter: a Minecraft server in a VM",
        "port": PORT,
        "max-players": 20,
        "online-mode": False,
        "logging": True,
        "gameMode": 1,
        "difficulty": 1,
        "worldFolder": WORLD_DIR + "/world",
        "generation": {"name": "superflat", "options": {"worldHeight": 80}},
        # A player is dropped after this long without keep-alive answers; flying-squid's
        # 10 s is too short on an emulated CPU, where a player's chunks can take longer.
        "kickTimeout": 30000,
        "plugins": {},
        "modpe": False,
        "view-distance": 4,
        "player-list-text": {"header": {"text": "drafter"}, "footer": {"text": "flying-squid"}},
        "everybody-op": True,
        "max-entities": 100,
        "version": version,
    }


def guest_setup(version: str) -> str:
    """Shell run in the guest's tree (chroot): the server's user, settings, service."""
    command = f"/usr/bin/node /{GUEST_DIR}/server.js /etc/minecraft/settings.json"
    return f"""
useradd --system --home-dir {WORLD_DIR} --shell /usr/sbin/nologin minecraft
mkdir -p {WORLD_DIR}/world /etc/minecraft
chown -R minecraft:minecraft {WORLD_DIR}
cat > /etc/minecraft/settings.json <<'EOF_SETTINGS'
{json.dumps(settings(version), indent=2)}
EOF_SETTINGS
cat > /etc/init.d/{SERVICE} <<'EOF_INIT'
#!/bin/sh
### BEGIN INIT INFO
# Provides:          {SERVICE}
# Required-Start:    $local_fs $network
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: Minecraft server (flying-squid)
### END INIT INFO
PIDFILE=/run/{SERVICE}.pid
case "$1" in
  start) start-stop-daemon --start --background --make-pidfile --pidfile $PIDFILE \\
           --chuid minecraft --chdir {WORLD_DIR} --output /var/log/{SERVICE}.log \\
           --startas /bin/sh -- -c "exec {command}" ;;
  stop) start-stop-daemon --stop --quiet --oknodo --pidfile $PIDFILE ;;
  restart) $0 stop; $0 start ;;
  *) echo "usage: $0 start|stop|restart"; exit 1 ;;
esac
exit 0
EOF_INIT
chmod 755 /etc/init.d/{SERVICE}
touch /var/log/{SERVICE}.log && chown minecraft /var/log/{SERVICE}.log
update-rc.d {SERVICE} defaults >/dev/null
"""


def find_npm() -> str:
    """The host's npm (on PATH, run by a node >= 18); MinecraftError if there is none."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise MinecraftError(
            "--app minecraft needs npm and node on the host (run scripts/install-deps)"
        )
    out = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    found = re.match(r"v(\d+)\.", out)
    if not found or int(found.group(1)) < MIN_NPM_NODE:
        raise MinecraftError(f"--app minecraft needs node >= {MIN_NPM_NODE} on the host, not {out}")
    return npm


def stage_key(version: str) -> str:
    """What the staged server is made of: the lock, the server script, this code."""
    h = hashlib.sha256(version.encode())
    for name in ("package.json", "package-lock.json", "server.js"):
        h.update(_files().joinpath(name).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def stage(target: Path, version: str) -> None:
    """Install the server (npm ci, locked versions) into ``target`` and trim its data."""
    npm = find_npm()
    target = target.resolve()  # npm runs in it: relative paths would land inside
    target.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json", "server.js"):
        (target / name).write_bytes(_files().joinpath(name).read_bytes())
    # npm's own cache stays beside the staging dir, not in the user's home.
    env = dict(os.environ, npm_config_cache=str(target.parent / "npm-cache"))
    p = subprocess.run(
        [npm, "ci", "--omit=dev", "--ignore-scripts", "--loglevel=error", *NPM_FLAGS],
        cwd=target,
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise MinecraftError(f"npm ci of the Minecraft server failed: {tail}")
    _check_flying_squid(target / "node_modules" / FLYING_SQUID)
    trim_data(target / "node_modules" / "minecraft-data", version)


def _check_flying_squid(path: Path) -> None:
    text = (path / "src/lib/version.js").read_text()
    found = re.search(r"testedVersions = \[([^\]]*)\]", text)
    tested = tuple(re.findall(r"'([^']+)'", found.group(1))) if found else ()
    if tested != SUPPORTED_VERSIONS:
        raise MinecraftError(f"the installed flying-squid serves {tested}, not the listed versions")


def data_folders(data: Path, version: str) -> set[str]:
    """The ``pc/...`` folders minecraft-data reads for ``version`` (data/dataPaths.json)."""
    paths = json.loads((data / "dataPaths.json").read_text())
    try:
        return {"pc/common", *paths["pc"][version].values()}
    except KeyError:
        raise MinecraftError(f"minecraft-data has no data for Minecraft {version}") from None


def trim_data(package: Path, version: str) -> None:
    """Remove every version's data but ``version``'s (and the common tables) from the
    minecraft-data package at ``package``; its docs and tools too."""
    data = package / "minecraft-data" / "data"
    keep = data_folders(data, version) | {"bedrock/common"}
    for edition in ("pc", "bedrock"):
        for folder in (data / edition).iterdir():
            if f"{edition}/{folder.name}" not in keep:
                shutil.rmtree(folder)
    for extra in ("doc", "tools"):
        shutil.rmtree(package / "minecraft-data" / extra, ignore_errors=True)
    shutil.rmtree(package / "doc", ignore_errors=True)
