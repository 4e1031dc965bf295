#!/usr/bin/env bash
# SelfTPT, cross-dataset (train on the source, test on every target). Settings: bash scripts/selftpt/xd.sh --help
PROTOCOL=xd
source "$(dirname "$0")/method.sh"
