#!/usr/bin/env bash
# MaPLe, few-shot (1 2 4 8 16 shots per class). Settings: bash scripts/maple/fewshot.sh --help
PROTOCOL=fewshot
source "$(dirname "$0")/method.sh"
