#!/usr/bin/env bash
# PromptSRC+TPT, domain generalisation (train on the source, test on its shifted variants). Settings: bash scripts/promptsrc_tpt/dg.sh --help
PROTOCOL=dg
source "$(dirname "$0")/method.sh"
