# PromptSRC+TPT's settings for scripts/promptsrc_tpt/*.sh (sourced); the protocol comes from the
# calling script. TPT per image on the prompts of a finished PromptSRC sweep over the same OUTPUT
# (run scripts/promptsrc/<protocol>.sh first). PROMPTS_FROM names that sweep's config or plan
# [PromptSRC/paper with DATA, PromptSRC/bench without]; the plan "paper" of this trainer gives its
# TRAINER.PROMPTSRC the loaded prompts' depth per protocol.
if [ -z "${DATA:-}" ]; then PROMPTS_FROM="${PROMPTS_FROM:-PromptSRC/bench}"; else PROMPTS_FROM="${PROMPTS_FROM:-PromptSRC/paper}"; fi
METHOD_DIR=promptsrc_tpt TRAINER=PromptSRCTPT PAPER_CFG=paper BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
