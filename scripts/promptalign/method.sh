# PromptAlign's settings for scripts/promptalign/*.sh (sourced); the protocol comes from the calling script.
# It starts from trained MaPLe prompts: run MaPLe first, then e.g.
#   PROMPTS_FROM=MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets bash scripts/promptalign/dg.sh
# The first run on a MaPLe model computes the source token statistics on the dataset that model was
# trained on and stores them next to it (MultiModalPromptLearner/promptalign_source_stats-<epoch>.pt);
# the other runs reuse them. PAPER_CFG is the plan "paper" (configs/plans.yaml): the released
# domain-generalisation config (lr 4e-2) for dg, the fine-grained one (lr 5e-4) for xd.
METHOD_DIR=promptalign TRAINER=PromptAlign PAPER_CFG=paper BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
