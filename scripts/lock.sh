#!/usr/bin/env bash
# The one lock: uv.lock pins every package the project installs, and the images' requirement files
# (docker/requirements-*.txt) are exported from it, hashes included.
#   scripts/lock.sh            after editing pyproject.toml: the lock follows it, changing no pin
#                              it need not, and the images' files are exported again (make lock)
#   scripts/lock.sh --upgrade  every pin to the newest release pyproject.toml admits (make lock UPGRADE=1)
#   scripts/lock.sh --check    exit 1 if uv.lock disagrees with pyproject.toml or an exported file
#                              with uv.lock (tests/test_lock.py); changes nothing
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-$(command -v uv || echo .venv/bin/uv)}
mode=${1:-}

# FILE and what it holds: the service image (the package and its store extra), the train image
# (adds the train extra; torch's CPU wheel is read from /opt/wheels, where the Dockerfile puts it),
# the CUDA image (onnxruntime-gpu in place of onnxruntime) and the build of the wheel.
exports() {
  echo "docker/requirements-service.txt --extra store"
  echo "docker/requirements-train.txt --extra store --extra train"
  echo "docker/requirements-cuda.txt --extra store --group cuda --no-emit-package onnxruntime"
  echo "docker/requirements-build.txt --only-group build"
}

export_to() {  # export_to FILE FLAGS...: what uv.lock gives FILE's image
  local file=$1; shift
  "$UV" export --quiet --frozen --no-emit-project --no-default-groups --format requirements-txt \
    --no-header "$@" | { echo "# Exported from uv.lock by scripts/lock.sh (make lock): do not edit."; cat; } > "$file"
}

case $mode in
  --check)
    "$UV" lock --check --quiet || { echo "uv.lock disagrees with pyproject.toml: run make lock" >&2; exit 1; }
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    status=0
    while read -r file flags; do
      # shellcheck disable=SC2086
      export_to "$tmp/out" $flags
      if ! cmp -s "$tmp/out" "$file"; then
        echo "$file differs from what uv.lock exports: run make lock" >&2
        diff "$file" "$tmp/out" | head -n 20 >&2 || true
        status=1
      fi
    done < <(exports)
    exit $status ;;
  --upgrade) "$UV" lock --upgrade ;;
  "") "$UV" lock ;;
  *) echo "scripts/lock.sh: unknown option $mode (expected --check or --upgrade)" >&2; exit 2 ;;
esac
while read -r file flags; do
  # shellcheck disable=SC2086
  export_to "$file" $flags
  echo "exported $file ($(grep -c '^[a-z]' "$file") packages)"
done < <(exports)
