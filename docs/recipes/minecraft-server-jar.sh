# Mojang's server.jar (or any Java server) as the VM's service, started at boot.
# drafter-blueprint runs this in the guest tree after --add-file has put the jar at
# /opt/minecraft/server.jar and openjdk-17-jre-headless is installed.
set -e
cd /opt/minecraft
echo "eula=true" > eula.txt  # you accept Mojang's EULA (https://aka.ms/MinecraftEULA)
cat > server.properties <<'EOF'
online-mode=false
server-port=25565
EOF
cat > /etc/init.d/minecraft-server <<'EOF'
#!/bin/sh
### BEGIN INIT INFO
# Provides:          minecraft-server
# Required-Start:    $network $local_fs
# Required-Stop:     $network $local_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
### END INIT INFO
pidfile=/run/minecraft-server.pid
case "$1" in
  start) start-stop-daemon --start --background --make-pidfile --pidfile "$pidfile" \
           --chdir /opt/minecraft --exec /usr/bin/java -- -Xmx1G -jar server.jar nogui ;;
  stop) start-stop-daemon --stop --retry 30 --pidfile "$pidfile" ;;
esac
EOF
chmod +x /etc/init.d/minecraft-server
update-rc.d minecraft-server defaults
