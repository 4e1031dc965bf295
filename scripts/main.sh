#!/usr/bin/env bash
# The main job: the base-to-new protocol for several methods, then one table side by side.
# Without $DATA it runs on the built-in CPU benchmark (minutes on two cores); with DATA set,
# on the paper's datasets. Settings as in scripts/common.sh (bash scripts/coop/base2new.sh --help),
# plus METHODS (default: "zsclip coop selftpt"; add tpt, cocoop). TPT is not in the default:
# tuning every test image is its cost, ~40 minutes for the benchmark's 3 seeds on two cores.
set -euo pipefail
# Relative OUTPUT/DATA are the user's: resolve them before changing to the repository.
for _var in OUTPUT DATA SELFTPT_DATA; do
  if [ -n "${!_var:-}" ] && [ "${!_var#/}" = "${!_var}" ]; then export "$_var=$PWD/${!_var}"; fi
done
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
# The benchmark's datasets, checked once for the whole job: where Fashion-MNIST's files are neither
# installed nor downloadable, the default leaves it out with one note line and a DATASETS that
# names it stops here with one error line saying how to get them.
if [ -z "${DATA:-}" ]; then
  # shellcheck disable=SC2086
  available="$("${PYTHON:-python}" -m selftpt.benchmark.protocols base2new --available ${DATASETS:+--datasets $DATASETS})"
  if [ -z "${DATASETS:-}" ] && [ "$available" != "$("${PYTHON:-python}" -m selftpt.benchmark.protocols base2new)" ]; then
    export DATASETS="$available"
  fi
fi
status=0
for method in ${METHODS:-zsclip coop selftpt}; do
  echo "=== $method ==="
  TABLE=0 bash "scripts/$method/base2new.sh" "$@" || status=1
done
[ "${DRY_RUN:-0}" = 1 ] && exit $status  # nothing ran: no table
# shellcheck disable=SC2086
"${PYTHON:-python}" parse_results.py "${OUTPUT:-output}/base2new" --seeds ${SEEDS:-1 2 3}
exit $status
