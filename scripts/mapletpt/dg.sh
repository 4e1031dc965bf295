#!/usr/bin/env bash
# MaPLe+TPT, domain generalisation (train on the source, test on its shifted variants). Settings: bash scripts/mapletpt/dg.sh --help
PROTOCOL=dg
source "$(dirname "$0")/method.sh"
