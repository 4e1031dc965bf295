#!/usr/bin/env bash
# PromptSRC, domain generalisation (train on the source, test on its shifted variants). Settings: bash scripts/promptsrc/dg.sh --help
PROTOCOL=dg
source "$(dirname "$0")/method.sh"
