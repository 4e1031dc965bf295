#!/usr/bin/env bash
# TPT, cross-dataset (train on the source, test on every target). Settings: bash scripts/tpt/xd.sh --help
PROTOCOL=xd
source "$(dirname "$0")/method.sh"
