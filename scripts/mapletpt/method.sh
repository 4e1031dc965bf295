# MaPLe+TPT's settings for scripts/mapletpt/*.sh (sourced); the protocol comes from the calling script.
# It starts from trained MaPLe prompts: run MaPLe first, then e.g.
#   PROMPTS_FROM=MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets bash scripts/mapletpt/xd.sh
# (the PROMPT_DEPTH of this config, 3, must be the loaded model's).
METHOD_DIR=mapletpt TRAINER=MaPLeTPT PAPER_CFG=vit_b16_c2_ep5_batch4_2ctx_cross_datasets BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
