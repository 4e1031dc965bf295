#!/usr/bin/env bash
# C-TPT, base-to-new (train on base classes, test on base and new). Settings: bash scripts/ctpt/base2new.sh --help
PROTOCOL=base2new
source "$(dirname "$0")/method.sh"
