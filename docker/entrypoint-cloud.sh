#!/usr/bin/env bash
# Cloud flavour: `lorabox verify --require-gpu --json`, then train $LORABOX_RECIPE into the output volume.
#   docker run --gpus all --ipc=host -e LORABOX_RECIPE=/recipe.yaml -v "$PWD/my.yaml:/recipe.yaml:ro" \
#     -v "$PWD/outputs:/outputs" lorabox:<version>-<env>-cloud
# Running the same command again after a stop or a preemption resumes from the newest complete checkpoint in
# /outputs/$LORABOX_RUN_NAME. On SIGTERM the trainer checkpoints and exits 143 (tini forwards the signal to it).
# Exit codes: verify's 1 (fail) or 3 (error) stop here; 2 = bad container configuration; else the trainer's.
set -eo pipefail
out=${LORABOX_OUTPUT_DIR:-/outputs}

if [ "${1:-}" = --health ]; then
  # HEALTHCHECK: healthy while something under the output volume changed in the last LORABOX_HEALTH_MINUTES.
  [ -n "$(find "$out" -mmin "-${LORABOX_HEALTH_MINUTES:-30}" -print -quit 2> /dev/null)" ]
  exit
fi

recipe=${LORABOX_RECIPE:-}
if [ -z "$recipe" ] || [ ! -f "$recipe" ]; then
  echo "lorabox cloud: LORABOX_RECIPE='$recipe' is not a file in the container." >&2
  echo "  mount your recipe and name it: -v \"\$PWD/my.yaml:/recipe.yaml:ro\" -e LORABOX_RECIPE=/recipe.yaml" >&2
  exit 2
fi
if [ ! -w "$out" ]; then
  echo "lorabox cloud: $out is not writable by $(id -un) (UID $(id -u))." >&2
  echo "  mount a volume there (-v lorabox-outputs:/outputs) or a host directory owned by UID $(id -u)" >&2
  exit 2
fi
run_dir="$out/${LORABOX_RUN_NAME:-run}"

# shellcheck disable=SC1091
source /app/activate.sh

verify_args=(--json)
if [ "${LORABOX_REQUIRE_GPU:-1}" = 1 ]; then
  verify_args+=(--require-gpu)
fi
set +e
lorabox verify "${verify_args[@]}" > "$out/verify.json"
status=$?
set -e
echo "lorabox cloud: verify exit $status (report: $out/verify.json)" >&2
if [ "$status" -eq 1 ] || [ "$status" -eq 3 ]; then
  cat "$out/verify.json" >&2
  exit "$status"
fi

echo "lorabox cloud: training $recipe into $run_dir (resumes from its newest complete checkpoint)" >&2
exec lorabox train --config "$recipe" --run-dir "$run_dir" "$@"
