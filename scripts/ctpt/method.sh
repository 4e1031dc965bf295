# C-TPT's settings for scripts/ctpt/*.sh (sourced); the protocol comes from the calling script.
# PAPER_CFG is the fine-grained config (lambda 50); for ImageNet and its shifts use
# CFG=vit_b16_ds (lambda 20, AugMix on), as C-TPT's scripts. C-TPT+CoOp: PROMPTS_FROM=CoOp/<cfg>.
METHOD_DIR=ctpt TRAINER=CTPT PAPER_CFG=vit_b16 BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
