#!/usr/bin/env bash
# C-TPT, domain generalisation (train on the source, test on its shifted variants). Settings: bash scripts/ctpt/dg.sh --help
PROTOCOL=dg
source "$(dirname "$0")/method.sh"
