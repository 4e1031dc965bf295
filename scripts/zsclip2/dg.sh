#!/usr/bin/env bash
# ZeroshotCLIP2 (prompt ensemble), domain generalisation (train on the source, test on its shifted variants). Settings: bash scripts/zsclip2/dg.sh --help
PROTOCOL=dg
source "$(dirname "$0")/method.sh"
