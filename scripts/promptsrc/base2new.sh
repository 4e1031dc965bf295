#!/usr/bin/env bash
# PromptSRC, base-to-new (train on base classes, test on base and new). Settings: bash scripts/promptsrc/base2new.sh --help
PROTOCOL=base2new
source "$(dirname "$0")/method.sh"
