# MaPLe's settings for scripts/maple/*.sh (sourced); the protocol comes from the calling script.
# PAPER_CFG is MaPLe's base-to-new / few-shot config; for cross-dataset and domain generalisation the
# paper trains on ImageNet with CFG=vit_b16_c2_ep5_batch4_2ctx_cross_datasets (depth 3, 2 epochs), the
# model MaPLe+TPT and PromptAlign start from. BENCH_CFG names ViT-B/16: the CPU benchmark's backbones
# are ResNets, which MaPLe's vision prompts cannot go into.
METHOD_DIR=maple TRAINER=MaPLe PAPER_CFG=vit_b16_c2_ep5_batch4_2ctx BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
