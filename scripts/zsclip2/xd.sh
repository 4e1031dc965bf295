#!/usr/bin/env bash
# ZeroshotCLIP2 (prompt ensemble), cross-dataset (train on the source, test on every target). Settings: bash scripts/zsclip2/xd.sh --help
PROTOCOL=xd
source "$(dirname "$0")/method.sh"
