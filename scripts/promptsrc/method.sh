# PromptSRC's settings for scripts/promptsrc/*.sh (sourced); the protocol comes from the calling script.
# PAPER_CFG follows PromptSRC's repository per protocol: base-to-new vit_b16_c2_ep20_batch4_4+4ctx,
# cross-dataset and domain generalisation its _cross_datasets config, few-shot its _few_shot config
# (GPA N(30, 30); the repository uses GPA_MEAN 45.0 GPA_STD 5.0 on StanfordCars, Flowers102,
# FGVCAircraft, DTD and EuroSAT: pass them as trailing KEY VALUE options for those datasets).
# PromptSRC needs a ViT backbone: the CPU benchmark (DATA unset) has only ResNets, and each of its
# runs stops with a one-line error saying so.
case "$PROTOCOL" in
  xd|dg) PAPER_CFG=vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets ;;
  fewshot) PAPER_CFG=vit_b16_c2_ep50_batch4_4+4ctx_few_shot ;;
  *) PAPER_CFG=vit_b16_c2_ep20_batch4_4+4ctx ;;
esac
METHOD_DIR=promptsrc TRAINER=PromptSRC BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
