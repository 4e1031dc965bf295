#!/usr/bin/env bash
# ZeroshotCLIP, cross-dataset (train on the source, test on every target). Settings: bash scripts/zsclip/xd.sh --help
PROTOCOL=xd
source "$(dirname "$0")/method.sh"
