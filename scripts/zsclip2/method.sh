# ZeroshotCLIP2's settings for scripts/zsclip2/*.sh (sourced); the protocol comes from the calling script.
# CFG=vit_b16_clip80 (or bench_clip80) averages CLIP's 80 ImageNet templates instead of CoOp's set.
METHOD_DIR=zsclip2 TRAINER=ZeroshotCLIP2 PAPER_CFG=vit_b16 BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
