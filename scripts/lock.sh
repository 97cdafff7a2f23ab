#!/usr/bin/env bash
# Re-lock: resolve requirements.txt and every extra of pyproject.toml to the newest versions in their ranges, for
# every platform and Python >= 3.10, into requirements.lock; then install the new lock and run the test suite, so
# that moving forward is one deliberate, tested step. Commit requirements.lock only if the suite passes.
#   bash scripts/lock.sh             # newest versions in range
#   bash scripts/lock.sh --dry-run   # show what would change, install nothing
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null || python -m pip install -q uv
previous=$(mktemp)
cp requirements.lock "$previous"
uv pip compile pyproject.toml --all-extras --universal --python-version 3.10 --upgrade --quiet \
    --custom-compile-command "bash scripts/lock.sh" -o requirements.lock
diff "$previous" requirements.lock | grep '^[<>] [A-Za-z]' || echo "requirements.lock: no version changed"
if [ "${1:-}" = "--dry-run" ]; then
    cp "$previous" requirements.lock
    exit 0
fi
bash scripts/install.sh slurm,qlora
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python -m pytest
