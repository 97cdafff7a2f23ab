"""The tables of a folder of runs: `lorpa report RUNS_DIR [--out PREFIX] [--metric best|last|selected]
[--stat mean|median] [--paired ROW ...]` (or `python -m lorpa.report`). The run folders are read by the harness
(`lorpa.harness.report`)."""

import sys

from .cli import run_cli
from .harness.report import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(run_cli(main))
