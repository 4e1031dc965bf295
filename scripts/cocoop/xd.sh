#!/usr/bin/env bash
# CoCoOp, cross-dataset (train on the source, test on every target). Settings: bash scripts/cocoop/xd.sh --help
PROTOCOL=xd
source "$(dirname "$0")/method.sh"
