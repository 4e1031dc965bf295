# CoOp's settings for scripts/coop/*.sh (sourced); the protocol comes from the calling script.
METHOD_DIR=coop TRAINER=CoOp PAPER_CFG=vit_b16_ep50_ctxv1 BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
