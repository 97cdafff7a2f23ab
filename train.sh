#!/usr/bin/env bash
# LoRPA runs: `bash train.sh` (offline demo), `bash train.sh CONFIG.yaml [flags]`,
# `bash train.sh --table glue-base|glue-large|summarization [--seeds 1,2,3] [--methods lorpa,lora]`.
# See `bash train.sh --help` and README.md.
set -euo pipefail
cd "$(dirname "$0")"
exec python -m lorpa.harness.launch "$@"
