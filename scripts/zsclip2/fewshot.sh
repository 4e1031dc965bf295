#!/usr/bin/env bash
# ZeroshotCLIP2 (prompt ensemble), few-shot (1 2 4 8 16 shots per class). Settings: bash scripts/zsclip2/fewshot.sh --help
PROTOCOL=fewshot
source "$(dirname "$0")/method.sh"
