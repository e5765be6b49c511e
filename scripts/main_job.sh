#!/usr/bin/env bash
# The main job, end to end without Docker: train and export, start the service, call every RPC
# with the Python client, write the pictures, print a summary, stop the service cleanly.
# Settings as in scripts/train_and_export.sh, plus PORT (50051) and OUT (out/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-50051}
OUT=${OUT:-out/demo}
LOG=${LOG:-out/serve.log}
mkdir -p "$(dirname "$LOG")"
REPO=${REPO:-models}
MODEL_NAME=${MODEL_NAME:-mnist}
data=()
[ -n "${DATA_DIR:-}" ] && data=(--data-dir "$DATA_DIR")

scripts/train_and_export.sh

echo "== vae serve --repo $REPO --model $MODEL_NAME --port $PORT"
vae serve --repo "$REPO" --model "$MODEL_NAME" --host 127.0.0.1 --port "$PORT" --metrics-port 0 --http-port 0 \
  > "$LOG" 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server"
    wait "$server" || { echo "vae serve exited with $?; see $LOG" >&2; return 1; }
  fi
}
trap 'stop_server' EXIT
for _ in $(seq 1 120); do
  vae health --target "127.0.0.1:$PORT" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { cat "$LOG" >&2; exit 1; }
  sleep 0.5
done
vae health --target "127.0.0.1:$PORT"

echo "== vae client --target 127.0.0.1:$PORT --out $OUT"
vae client --target "127.0.0.1:$PORT" "${data[@]}" --out "$OUT"
stop_server
trap - EXIT
echo "== done: service stopped cleanly; pictures in $OUT, training plots in ${RUN_DIR:-runs/seed}/plots"
