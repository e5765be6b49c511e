#!/usr/bin/env bash
# A Python base image made from Debian's packages, for machines that cannot pull the official
# python image (no Docker Hub) but reach Debian's archive: bookworm's python3 (3.11), its venv
# module and the CA certificates, imported as TAG. Docs, man pages and locales are left out.
# Usage: docker/debian-base.sh [TAG]   (default vaeserve-python:3.11-bookworm; kept if present)
set -euo pipefail
tag=${1:-vaeserve-python:3.11-bookworm}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag: present"
  exit 0
fi
command -v mmdebstrap >/dev/null || {
  echo "docker/debian-base.sh: mmdebstrap is missing (apt-get install mmdebstrap)" >&2
  exit 1
}
rootfs=$(mktemp --suffix=.tar)
trap 'rm -f "$rootfs"' EXIT
start=$(date +%s)
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  bookworm "$rootfs"
docker import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' "$rootfs" "$tag" >/dev/null
echo "base image $tag: made from Debian bookworm in $(($(date +%s) - start)) s," \
  "$(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1 / 1e6}')"
