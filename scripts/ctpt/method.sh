# C-TPT's settings for scripts/ctpt/*.sh (sourced); the protocol comes from the calling script.
# PAPER_CFG is the plan "paper" (configs/plans.yaml): lambda 50 on the fine-grained datasets,
# vit_b16_ds (lambda 20, AugMix on) on ImageNet and its shifts, as C-TPT's scripts.
# C-TPT+CoOp: PROMPTS_FROM=CoOp/<cfg>.
METHOD_DIR=ctpt TRAINER=CTPT PAPER_CFG=paper BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
