#!/usr/bin/env bash
# ZeroshotCLIP, domain generalisation (train on the source, test on its shifted variants). Settings: bash scripts/zsclip/dg.sh --help
PROTOCOL=dg
source "$(dirname "$0")/method.sh"
