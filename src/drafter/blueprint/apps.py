"""Application recipes: what a blueprint installs and how the guest says it is up.

A recipe is data: Debian packages, the init script of the service, the TCP port the
liveness signal waits for, and a shell script run inside the root file system
(chroot) after the packages are installed. Users add their own application with
``drafter-blueprint --app none --extra-packages ... --customize-script ...``
(see docs/blueprint.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drafter.blueprint import container, minecraft


@dataclass(frozen=True)
class AppRecipe:
    name: str
    packages: list[str] = field(default_factory=list)
    service: str = ""  # init script the agent and liveness services start after
    port: int = 0  # liveness waits until this port accepts connections (0: don't wait)
    setup: str = ""  # shell run in the chroot after installation
    disk_size: str = "384M"
    # A directory built on the host at blueprint time (by the app's module, e.g.
    # minecraft.stage) and copied to this path in the guest before ``setup`` runs.
    payload: str = ""


REDIS = AppRecipe(
    name="redis",
    packages=["redis-server"],
    service="redis-server",
    port=6379,
    setup="""
sed -i -e 's/^bind .*/bind 0.0.0.0/' -e 's/^protected-mode .*/protected-mode no/' \\
    /etc/redis/redis.conf
""",
    disk_size="384M",
)

POSTGRESQL = AppRecipe(
    name="postgresql",
    packages=["postgresql"],
    service="postgresql",
    port=5432,
    # Demo blueprint: the network is the namespace's private link, so trust it.
    setup="""
conf=$(ls -d /etc/postgresql/*/main | head -n1)
echo "listen_addresses = '*'" >> "$conf/postgresql.conf"
echo "host all all 0.0.0.0/0 trust" >> "$conf/pg_hba.conf"
""",
    disk_size="768M",
)

NONE = AppRecipe(name="none")


def minecraft_recipe(version: str = minecraft.DEFAULT_VERSION) -> AppRecipe:
    """flying-squid serving Minecraft ``version`` (checked: MinecraftError if not served)."""
    return AppRecipe(
        name="minecraft",
        packages=["nodejs"],
        service=minecraft.SERVICE,
        port=minecraft.PORT,
        setup=minecraft.guest_setup(minecraft.check_version(version)),
        disk_size="640M",
        payload=minecraft.GUEST_DIR,
    )


MINECRAFT = minecraft_recipe()

# The base of ``drafter-blueprint --oci-image``: the OCI runtime and the service that
# starts the container; the image itself is added per image (see oci.py).
OCI = AppRecipe(
    name="oci",
    packages=[container.RUNTIME],
    service=container.SERVICE,
    setup=f"""
cat > /etc/init.d/{container.SERVICE} <<'EOF_INIT'
{container.CONTAINER_INIT}EOF_INIT
chmod 755 /etc/init.d/{container.SERVICE}
update-rc.d {container.SERVICE} defaults >/dev/null
""",
)

RECIPES: dict[str, AppRecipe] = {r.name: r for r in (REDIS, POSTGRESQL, MINECRAFT, NONE)}
