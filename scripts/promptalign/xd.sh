#!/usr/bin/env bash
# PromptAlign, cross-dataset (train on the source, test on every target). Settings: bash scripts/promptalign/xd.sh --help
PROTOCOL=xd
source "$(dirname "$0")/method.sh"
