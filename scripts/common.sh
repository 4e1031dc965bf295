# Shared by scripts/<method>/<protocol>.sh: settings from the environment, defaults, the sweep
# and the closing table. Sourced, not run.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python}"

usage() {
  cat <<USAGE
Usage: [VAR=value ...] bash scripts/${METHOD_DIR}/${PROTOCOL}.sh [KEY VALUE ...]

Runs the ${PROTOCOL} protocol for ${TRAINER} over seeds (and shots), skipping finished runs and
resuming interrupted ones, then prints the table of every method found under \$OUTPUT/${PROTOCOL}.
Trailing KEY VALUE pairs are passed to train.py as config options.

Environment (defaults in brackets):
  DATA      dataset root as prepared for CoOp (see DATASETS.md)
            [unset: the built-in CPU benchmark, generated on first use]
  DATASETS  dataset config stems under configs/datasets [the protocol's datasets]
  SOURCE    source dataset for xd/dg (and optional for base2new) [imagenet, or the benchmark's]
  SEEDS     [1 2 3]      SHOTS [16; fewshot: 1 2 4 8 16]
  BACKBONE  override MODEL.BACKBONE.NAME [the config's]
  CFG       a config plan of configs/plans.yaml (a config per dataset and shot count, as a
            published protocol prescribes) or a config stem under configs/trainers/${TRAINER}/
            (that one config for every run); run folders name the config each run used
            [${PAPER_CFG} with DATA, ${BENCH_CFG} without]
  OUTPUT    output root [output]
  PROMPTS_FROM  <Trainer>/<cfg or plan> whose trained prompts a training-free method starts from,
            e.g. PROMPTS_FROM=CoOp/bench bash scripts/tpt/base2new.sh = TPT+CoOp (run CoOp first)
  JOBS      runs at once, round-robin over CUDA_VISIBLE_DEVICES when GPUs exist
            [0 = auto: one per GPU, else one per CPU core]
  TABLE     print the closing table (1) or not (0) [1]
USAGE
}

run_protocol() {
  case "${1:-}" in -h|--help) usage; exit 0 ;; esac
  if [ -z "${DATA:-}" ]; then CFG="${CFG:-$BENCH_CFG}"; else CFG="${CFG:-$PAPER_CFG}"; fi
  local output="${OUTPUT:-output}"
  local status=0
  # shellcheck disable=SC2086
  "$PY" -m selftpt.sweep "$PROTOCOL" --trainer "$TRAINER" --cfg "$CFG" --data "${DATA:-}" \
    ${DATASETS:+--datasets $DATASETS} ${SOURCE+--source "$SOURCE"} --seeds ${SEEDS:-1 2 3} \
    ${SHOTS:+--shots $SHOTS} --output "$output" --jobs "${JOBS:-0}" ${BACKBONE:+--backbone "$BACKBONE"} \
    ${PROMPTS_FROM:+--prompts-from "$PROMPTS_FROM"} \
    -- "$@" || status=$?
  if [ "${TABLE:-1}" = 1 ]; then
    # shellcheck disable=SC2086
    "$PY" parse_results.py "$output/$PROTOCOL" --seeds ${SEEDS:-1 2 3} || true
  fi
  return $status
}
