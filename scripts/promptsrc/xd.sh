#!/usr/bin/env bash
# PromptSRC, cross-dataset (train on the source, test on every target). Settings: bash scripts/promptsrc/xd.sh --help
PROTOCOL=xd
source "$(dirname "$0")/method.sh"
