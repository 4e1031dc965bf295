#!/usr/bin/env bash
# C-TPT, few-shot (1 2 4 8 16 shots per class). Settings: bash scripts/ctpt/fewshot.sh --help
PROTOCOL=fewshot
source "$(dirname "$0")/method.sh"
