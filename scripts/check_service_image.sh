#!/usr/bin/env bash
# The service image's dependency set, checked without Docker: a clean venv gets exactly
# docker/requirements-service.txt and the vaeserve wheel (no deps), torch must not be
# importable there, and `vae serve` from it must answer health checks and calls.
# Usage: scripts/check_service_image.sh MODEL_REPO   (a repository exported beforehand)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(realpath "$1")
work=$(mktemp -d)
server=
cleanup() {
  if [ -n "$server" ]; then kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet -r docker/requirements-service.txt
"$work/venv/bin/pip" wheel --quiet --no-deps --wheel-dir "$work/dist" .
"$work/venv/bin/pip" install --quiet --no-deps "$work"/dist/vaeserve-*.whl
if "$work/venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "torch is importable in the service environment" >&2; exit 1
fi
port=$("$work/venv/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
http_port=$("$work/venv/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
(cd "$work" && VAESERVE_REPO="$repo" VAESERVE_HOST=127.0.0.1 VAESERVE_PORT="$port" VAESERVE_METRICS_PORT=0 \
  VAESERVE_HTTP_PORT="$http_port" \
  exec "$work/venv/bin/vae" serve) > "$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 120); do
  VAESERVE_PORT="$port" "$work/venv/bin/vae" health >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.5
done
VAESERVE_PORT="$port" "$work/venv/bin/vae" health
"$work/venv/bin/python" - "$port" "$http_port" <<'PY'
import json, sys, urllib.request
from vaeserve.client import VaeClient
with VaeClient(f"127.0.0.1:{sys.argv[1]}") as client:
    out = client.sample_prior(8, seed=0)
    assert out["samples"].shape[0] == 8, out
    name = client.model_info()[0]["name"]
body = {"inputs": [{"name": "count", "datatype": "INT64", "shape": [1], "data": [8]}], "parameters": {"seed": 0}}
request = urllib.request.Request(
    f"http://127.0.0.1:{sys.argv[2]}/v2/models/{name}-sample-prior/infer", json.dumps(body).encode()
)
answer = json.load(urllib.request.urlopen(request, timeout=30))
assert answer["outputs"][2]["shape"] == [8, len(out["samples"][0])], answer["outputs"][2]["shape"]
print("service image dependency set: serves vae.v1 and OIP HTTP without torch")
PY
kill -TERM "$server"; wait "$server"; server=
echo "vae serve exited cleanly"
