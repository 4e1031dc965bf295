# ZeroshotCLIP's settings for scripts/zsclip/*.sh (sourced); the protocol comes from the calling script.
METHOD_DIR=zsclip TRAINER=ZeroshotCLIP PAPER_CFG=vit_b16 BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
