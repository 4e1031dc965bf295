# CoOp's settings for scripts/coop/*.sh (sourced); the protocol comes from the calling script.
# PAPER_CFG is the plan "paper" of configs/plans.yaml: the published config per dataset and shot
# count (base-to-new as CoCoOp's paper ran CoOp, few-shot as CoOp's paper).
METHOD_DIR=coop TRAINER=CoOp PAPER_CFG=paper BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
