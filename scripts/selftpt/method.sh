# SelfTPT's settings for scripts/selftpt/*.sh (sourced); the protocol comes from the calling script.
METHOD_DIR=selftpt TRAINER=SelfTPT PAPER_CFG=vit_b16_c4_ep10 BENCH_CFG=bench
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_protocol "$@"
