#!/usr/bin/env bash
# Train, evaluate and export one model into the repository. Docker's `train` service and the
# main job (scripts/main_job.sh) both run this; every setting comes from the environment.
#   DATA_DIR     folder of the IDX files (empty: the download cache)
#   PRESET       training preset (seed)           EPOCHS, LIMIT  optional overrides
#   RUN_DIR      run directory (runs/seed)         IW_SAMPLES     k of the test NLL (1000)
#   REPO         model repository (models)         MODEL_NAME     name in it (mnist)
#   MODEL_VERSION  version to (re)write (1)        VARIANTS       extra variants (int8)
set -euo pipefail
PRESET=${PRESET:-seed}
RUN_DIR=${RUN_DIR:-runs/seed}
REPO=${REPO:-models}
MODEL_NAME=${MODEL_NAME:-mnist}
MODEL_VERSION=${MODEL_VERSION:-1}
IW_SAMPLES=${IW_SAMPLES:-1000}
VARIANTS=${VARIANTS:-int8}
data=()
[ -n "${DATA_DIR:-}" ] && data=(--data-dir "$DATA_DIR")
train=(--preset "$PRESET" --out "$RUN_DIR")
[ -n "${EPOCHS:-}" ] && train+=(--epochs "$EPOCHS")
[ -n "${LIMIT:-}" ] && train+=(--limit "$LIMIT")
[ -n "${HIDDEN_SIZES:-}" ] && train+=(--hidden-sizes $HIDDEN_SIZES)
[ -n "${LATENT_SIZE:-}" ] && train+=(--latent-size "$LATENT_SIZE")
if [ -f "$RUN_DIR/checkpoint.pt" ]; then
  train=(--out "$RUN_DIR" --resume ${EPOCHS:+--epochs "$EPOCHS"})
fi
echo "== vae train ${data[*]} ${train[*]}"
vae train "${data[@]}" "${train[@]}"
echo "== vae evaluate --run $RUN_DIR ${data[*]} --iw-samples $IW_SAMPLES"
vae evaluate --run "$RUN_DIR" "${data[@]}" --iw-samples "$IW_SAMPLES" --no-progress
echo "== vae export --checkpoint $RUN_DIR --repo $REPO --name $MODEL_NAME --version $MODEL_VERSION"
vae export --checkpoint "$RUN_DIR" --repo "$REPO" --name "$MODEL_NAME" --version "$MODEL_VERSION" --force \
  ${VARIANTS:+--variants "$VARIANTS"} "${data[@]}" --no-progress
