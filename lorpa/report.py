"""The tables of a folder of runs: `python -m lorpa.report RUNS_DIR [--out PREFIX] [--metric best|last|selected]
[--stat mean|median] [--paired ROW ...]`. The run folders are read by the harness (`lorpa.harness.report`)."""

import sys

from .cli import run_cli
from .harness.report import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
