#!/usr/bin/env bash
# CoOp, domain generalisation (train on the source, test on its shifted variants). Settings: bash scripts/coop/dg.sh --help
PROTOCOL=dg
source "$(dirname "$0")/method.sh"
