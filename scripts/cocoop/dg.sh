#!/usr/bin/env bash
# CoCoOp, domain generalisation (train on the source, test on its shifted variants). Settings: bash scripts/cocoop/dg.sh --help
PROTOCOL=dg
source "$(dirname "$0")/method.sh"
