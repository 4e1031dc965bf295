#!/usr/bin/env bash
# MaPLe, cross-dataset (train on the source, test on every target). Settings: bash scripts/maple/xd.sh --help
PROTOCOL=xd
source "$(dirname "$0")/method.sh"
