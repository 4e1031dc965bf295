#!/usr/bin/env bash
# PromptAlign, base-to-new (train on base classes, test on base and new). Settings: bash scripts/promptalign/base2new.sh --help
PROTOCOL=base2new
source "$(dirname "$0")/method.sh"
