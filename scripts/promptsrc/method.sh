# PromptSRC's settings for scripts/promptsrc/*.sh (sourced); the protocol comes from the calling script.
# PAPER_CFG is the plan "paper" (configs/plans.yaml): PromptSRC's repository's config per protocol.
# PromptSRC needs a ViT backbone: the CPU benchmark (DATA unset) has only ResNets, and each of its
# runs stops with a one-line error saying so.
METHOD_DIR=promptsrc TRAINER=PromptSRC PAPER_CFG=paper BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
