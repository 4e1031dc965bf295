# PromptSRC+TPT's settings for scripts/promptsrc_tpt/*.sh (sourced); the protocol comes from the
# calling script. TPT per image on the prompts of a finished PromptSRC sweep over the same OUTPUT
# (run scripts/promptsrc/<protocol>.sh first). PROMPTS_FROM names that sweep's config, and CFG's
# TRAINER.PROMPTSRC must describe its prompts: vit_b16 goes with the base-to-new and few-shot
# configs (depth 9), vit_b16_xd with the cross-dataset one (depth 3). Rows are named PromptSRC+TPT.
case "$PROTOCOL" in
  xd|dg) PAPER_CFG=vit_b16_xd PROMPTSRC_CFG=vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets ;;
  fewshot) PAPER_CFG=vit_b16 PROMPTSRC_CFG=vit_b16_c2_ep50_batch4_4+4ctx_few_shot ;;
  *) PAPER_CFG=vit_b16 PROMPTSRC_CFG=vit_b16_c2_ep20_batch4_4+4ctx ;;
esac
if [ -z "${DATA:-}" ]; then PROMPTSRC_CFG=bench; fi
PROMPTS_FROM="${PROMPTS_FROM:-PromptSRC/$PROMPTSRC_CFG}"
METHOD_DIR=promptsrc_tpt TRAINER=PromptSRCTPT BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@" TRAINER.METHOD_NAME PromptSRC+TPT
