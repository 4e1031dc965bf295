#!/usr/bin/env bash
# PromptAlign, domain generalisation (train on the source, test on its shifted variants). Settings: bash scripts/promptalign/dg.sh --help
PROTOCOL=dg
source "$(dirname "$0")/method.sh"
