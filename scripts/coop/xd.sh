#!/usr/bin/env bash
# CoOp, cross-dataset (train on the source, test on every target). Settings: bash scripts/coop/xd.sh --help
PROTOCOL=xd
source "$(dirname "$0")/method.sh"
