#!/usr/bin/env bash
# ZeroshotCLIP2 (prompt ensemble), base-to-new (train on base classes, test on base and new). Settings: bash scripts/zsclip2/base2new.sh --help
PROTOCOL=base2new
source "$(dirname "$0")/method.sh"
