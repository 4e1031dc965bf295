# Shared by scripts/<method>/<protocol>.sh: settings from the environment, defaults, the sweep
# and the closing table. Sourced, not run.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Paths given in the environment are the user's: relative ones are resolved against the
# directory the script was started from, before changing to the repository (where train.py and
# the configs are, as in CoOp).
CALLER_DIR="$PWD"
for _var in OUTPUT DATA SELFTPT_DATA; do
  if [ -n "${!_var:-}" ] && [ "${!_var#/}" = "${!_var}" ]; then
    export "$_var=$CALLER_DIR/${!_var}"
  fi
done
unset _var
cd "$REPO"
PY="${PYTHON:-python}"

usage() {
  cat <<USAGE
Usage: [VAR=value ...] bash scripts/${METHOD_DIR}/${PROTOCOL}.sh [KEY VALUE ...]

Runs the ${PROTOCOL} protocol for ${TRAINER} over seeds (and shots), skipping finished runs and
resuming interrupted ones, then prints the table of every method found under \$OUTPUT/${PROTOCOL}.
Trailing KEY VALUE pairs are passed to train.py as config options, e.g. a quick check that
still trains (the first epoch of every shipped config is a constant warm-up at lr 1e-5):
  SEEDS=1 DATASETS=shapeworld OUTPUT=/tmp/quick bash scripts/${METHOD_DIR}/${PROTOCOL}.sh OPTIM.MAX_EPOCH 3

Environment (defaults in brackets; relative paths are relative to your current directory):
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
  OUTPUT    output root [output in the repository]
  PROMPTS_FROM  <Trainer>/<cfg or plan> whose trained prompts a training-free method starts from,
            e.g. PROMPTS_FROM=CoOp/bench bash scripts/tpt/base2new.sh = TPT+CoOp (run CoOp first)
  JOBS      runs at once, round-robin over CUDA_VISIBLE_DEVICES when GPUs exist
            [0 = auto: one per GPU, else one per CPU core]
  SHARDS    split every evaluation still to do (a training run's too: it trains first, then its
            shards resume after the last epoch) into this many shards of its test set, run side
            by side (workers, or SLURM array tasks) and merged into the run's results.json,
            equal to an unsharded run's [1]
  CHANGED   what to do with finished runs made with other settings (other KEY VALUE options, an
            edited config): rerun = run again in a new folder next to each (seed1-2; tables count
            the newest), replace = move each aside (.seed1.replaced-<time>, out of the tables)
            and run again in its folder [unset: list them and stop before running anything]
  TABLE     print the closing table (1) or not (0) [1]
  LAUNCHER  local = worker processes on this machine; slurm = one SLURM job per chain (a training
            run and its tests), submitted as a job array through submitit (pip install -e ".[slurm]");
            the script waits for the jobs and prints the table [local]
  DRY_RUN   1 = print what would run (or be submitted) and stop [0]

On SLURM (LAUNCHER=slurm), each job asks for (unset: the cluster's defaults):
$("$PY" -c 'from selftpt.slurm import describe_help; print(describe_help())' 2>/dev/null \
   || echo "  (see selftpt/slurm.py)")
Finished runs are skipped before submitting; a job preempted or out of time is requeued and
resumes from its checkpoints; a job that fails is named with its SLURM id and log.

Runs held by another sweep over the same OUTPUT are left to it (and listed); Ctrl-C stops every
run, each resumes where it was when the same command is run again.
USAGE
}

# The command that repeats this sweep, printed by the sweep as the way to resume it: the
# settings given (paths already absolute), the script, its arguments.
sweep_command() {
  local cmd="" var
  for var in PYTHON SELFTPT_DATA DATA DATASETS SOURCE SEEDS SHOTS BACKBONE CFG OUTPUT PROMPTS_FROM JOBS SHARDS TABLE \
             LAUNCHER SUBMIT_CONFIG SUBMIT_PARTITION SUBMIT_TIME SUBMIT_GPUS SUBMIT_CPUS SUBMIT_MEM SUBMIT_ACCOUNT \
             SUBMIT_QOS SUBMIT_ARRAY_PARALLELISM SUBMIT_SBATCH SUBMIT_SETUP; do
    if [ -n "${!var+x}" ]; then cmd+="$var=$(printf '%q' "${!var}") "; fi
  done
  printf '%sbash %q' "$cmd" "$0"
  if [ $# -gt 0 ]; then printf ' %q' "$@"; fi
}

run_protocol() {
  case "${1:-}" in -h|--help) usage; exit 0 ;; esac
  local command change=()
  command="$(sweep_command "$@")"
  case "${CHANGED:-}" in
    "") ;;
    rerun|replace) change=("--$CHANGED-changed") ;;
    *) echo "error: CHANGED is '$CHANGED'; use CHANGED=rerun or CHANGED=replace (see --help)" >&2; return 2 ;;
  esac
  if [ -z "${DATA:-}" ]; then CFG="${CFG:-$BENCH_CFG}"; else CFG="${CFG:-$PAPER_CFG}"; fi
  local output="${OUTPUT:-$REPO/output}"
  local status=0
  # --register: the sweep and each of its workers import the repository's datasets and trainers
  # (the library imports neither by itself)
  # shellcheck disable=SC2086
  "$PY" -m selftpt.sweep --register datasets --register trainers \
    "$PROTOCOL" --trainer "$TRAINER" --cfg "$CFG" --data "${DATA:-}" \
    ${DATASETS:+--datasets $DATASETS} ${SOURCE+--source "$SOURCE"} --seeds ${SEEDS:-1 2 3} \
    ${SHOTS:+--shots $SHOTS} --output "$output" --jobs "${JOBS:-0}" --shards "${SHARDS:-1}" ${BACKBONE:+--backbone "$BACKBONE"} \
    ${PROMPTS_FROM:+--prompts-from "$PROMPTS_FROM"} ${change[@]+"${change[@]}"} --command "$command" \
    --launcher "${LAUNCHER:-local}" $([ "${DRY_RUN:-0}" = 1 ] && echo --dry-run) \
    -- "$@" || status=$?
  case "$status" in
    130)  # Ctrl-C: no table; end as interrupted too, so that a calling script stops as well
      trap - INT
      kill -INT $$
      exit 130 ;;
    143) exit 143 ;;  # SIGTERM
    3) return 3 ;;  # changed settings, nothing ran: a table of the old runs would only mislead
  esac
  if [ "${TABLE:-1}" = 1 ] && [ "${DRY_RUN:-0}" != 1 ]; then
    # shellcheck disable=SC2086
    "$PY" parse_results.py "$output/$PROTOCOL" --seeds ${SEEDS:-1 2 3} || true
  fi
  return $status
}
