# MaPLe's settings for scripts/maple/*.sh (sourced); the protocol comes from the calling script.
# PAPER_CFG is the plan "paper" (configs/plans.yaml): base-to-new / few-shot vit_b16_c2_ep5_batch4_2ctx,
# cross-dataset and domain generalisation its _cross_datasets config (depth 3), the model MaPLe+TPT
# and PromptAlign start from. MaPLe needs a ViT backbone: the CPU benchmark's are ResNets, and each
# of its runs stops with a one-line error saying so.
METHOD_DIR=maple TRAINER=MaPLe PAPER_CFG=paper BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
