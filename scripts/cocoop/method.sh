# CoCoOp's settings for scripts/cocoop/*.sh (sourced); the protocol comes from the calling script.
METHOD_DIR=cocoop TRAINER=CoCoOp PAPER_CFG=vit_b16_c4_ep10_batch1_ctxv1 BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
