#!/usr/bin/env bash
# MaPLe, domain generalisation (train on the source, test on its shifted variants). Settings: bash scripts/maple/dg.sh --help
PROTOCOL=dg
source "$(dirname "$0")/method.sh"
