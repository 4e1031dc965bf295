#!/usr/bin/env bash
# MaPLe+TPT, cross-dataset (train on the source, test on every target). Settings: bash scripts/mapletpt/xd.sh --help
PROTOCOL=xd
source "$(dirname "$0")/method.sh"
