#!/usr/bin/env bash
# SelfTPT, domain generalisation (train on the source, test on its shifted variants). Settings: bash scripts/selftpt/dg.sh --help
PROTOCOL=dg
source "$(dirname "$0")/method.sh"
