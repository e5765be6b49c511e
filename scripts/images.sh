#!/usr/bin/env bash
# `make images`: builds vaeserve (service), vaeserve-train and vaeserve-cuda, each tagged latest
# and with the package version, with the classic builder (no `# syntax=` image to pull).
#   PYTHON_BASE=auto      the official python image if it can be pulled, else one made from
#                         Debian's packages (docker/debian-base.sh)
#   PYTHON_BASE=official  python:3.11.11-slim-bookworm, pulled
#   PYTHON_BASE=debian    the Debian-made base
#   IMAGES="service train cuda"   which to build
#   NO_CACHE=1            build without Docker's layer cache
# It stages docker/local/: the CA bundle the host's pip trusts, and torch's CPU wheel, the file
# docker/requirements-train.txt (exported from uv.lock) names, with its hash.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BASE=${PYTHON_BASE:-auto}
IMAGES=${IMAGES:-service train cuda}
OFFICIAL=python:3.11.11-slim-bookworm
DEBIAN=vaeserve-python:3.11-bookworm
export DOCKER_BUILDKIT=0
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)

pip_setting() {  # pip's own setting NAME (PIP_NAME in the environment wins, as in pip)
  local env="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  if [ -n "${!env:-}" ]; then echo "${!env}"; return; fi
  python3 -m pip config list 2>/dev/null | sed -n "s/^[a-z:]*\.$1='\(.*\)'$/\1/p" | head -n 1
}

stage_local_files() {
  local cert wheel
  rm -f docker/local/ca/ca-certificates.crt
  cert=$(pip_setting cert)
  [ -n "$cert" ] && [ -f "$cert" ] && cp "$cert" docker/local/ca/ca-certificates.crt
  # The train image installs torch from the path the lock records (the build checks its hash).
  wheel=$(sed -n 's|^file://\(/[^ ]*\.whl\).*|\1|p' docker/requirements-train.txt | head -n 1)
  find docker/local/wheels -name '*.whl' ! -name "$(basename "${wheel:-none}")" -delete
  if [[ " $IMAGES " == *" train "* ]] && [ -n "$wheel" ] && [ ! -f "docker/local/wheels/$(basename "$wheel")" ]; then
    [ -f "$wheel" ] || { echo "make images: the train image needs $wheel (uv.lock's torch); it is not here" >&2; exit 1; }
    ln "$wheel" docker/local/wheels/ 2>/dev/null || cp "$wheel" docker/local/wheels/
  fi
  echo "staged: CA bundle ${cert:-none}; torch wheel ${wheel:-none}"
}

choose_base() {
  case $PYTHON_BASE in
    official) docker pull -q "$OFFICIAL" >/dev/null && base=$OFFICIAL ;;
    debian) docker/debian-base.sh "$DEBIAN" && base=$DEBIAN ;;
    auto)
      if docker image inspect "$OFFICIAL" >/dev/null 2>&1 || docker pull -q "$OFFICIAL" >/dev/null 2>&1; then
        base=$OFFICIAL
      else
        echo "cannot pull $OFFICIAL: using a base made from Debian's packages"
        docker/debian-base.sh "$DEBIAN" && base=$DEBIAN
      fi ;;
    *) echo "PYTHON_BASE=$PYTHON_BASE: expected auto, official or debian" >&2; exit 2 ;;
  esac
  echo "base image: $base"
}

build() {  # build TARGET NAME
  local start log
  start=$(date +%s)
  log=$(mktemp)
  if ! docker build --quiet ${NO_CACHE:+--no-cache} --build-arg "BASE_IMAGE=$base" --target "$1" \
      -t "$2:latest" -t "$2:$version" . >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"
    echo "make images: building $2 ($1) failed" >&2; exit 1
  fi
  rm -f "$log"
  echo "built $2:latest and $2:$version in $(($(date +%s) - start)) s," \
    "$(docker image inspect -f '{{.Size}}' "$2:latest" | awk '{printf "%.0f MB", $1 / 1e6}')"
}

stage_local_files
choose_base
for image in $IMAGES; do
  case $image in
    service) build service vaeserve ;;
    train) build train vaeserve-train ;;
    cuda) build service-cuda vaeserve-cuda ;;
    *) echo "IMAGES: unknown image '$image' (service, train, cuda)" >&2; exit 2 ;;
  esac
done
