# TPT's settings for scripts/tpt/*.sh (sourced); the protocol comes from the calling script.
METHOD_DIR=tpt TRAINER=TPT PAPER_CFG=vit_b16 BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
