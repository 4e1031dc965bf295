#!/usr/bin/env bash
# PromptSRC+TPT, cross-dataset (train on the source, test on every target). Settings: bash scripts/promptsrc_tpt/xd.sh --help
PROTOCOL=xd
source "$(dirname "$0")/method.sh"
