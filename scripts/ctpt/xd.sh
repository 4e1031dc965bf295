#!/usr/bin/env bash
# C-TPT, cross-dataset (train on the source, test on every target). Settings: bash scripts/ctpt/xd.sh --help
PROTOCOL=xd
source "$(dirname "$0")/method.sh"
