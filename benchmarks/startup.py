"""Start-up of the `lorpa` command against `python -c "import torch"`, the least any tool reading tensors pays.

Each variant is a fresh process (wall time from spawn to exit); rounds interleave the variants, the first round
(it warms the page cache) is dropped, medians of --repeats. The small adapter is a 2-layer LLaMA-shaped one (14
modules, hidden 64, r = 8), so what is timed is start-up, not the work. With `--before DIR` (a checkout of an
earlier version) its `python -m lorpa.inspect` runs too, for the side-by-side change.

    python benchmarks/startup.py [--repeats 10] [--before DIR]

Goals: `lorpa inspect --help` within 1.5x `import torch`; `lorpa inspect` on the small adapter within 2x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from prune_adapter import written_adapter

SMALL_ADAPTER = argparse.Namespace(dtype="fp32", layers=2, hidden=64, intermediate=172, r=8)


def lorpa_command() -> list[str]:
    """The installed console script; without one, the same entry point through the interpreter."""
    script = shutil.which("lorpa")
    return [script] if script else [sys.executable, "-c", "import sys; from lorpa.commands import main; "
                                                          "sys.exit(main())"]


def wall_time(command: list[str], environment: dict, folder: Path) -> float:
    """Run from `folder`, outside any checkout: `python -m` puts the working folder first on the path."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=environment, timeout=120, cwd=folder)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--before", type=Path, default=None, help="a checkout of an earlier version to time beside")
    args = parser.parse_args()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    lorpa = lorpa_command()
    with written_adapter(SMALL_ADAPTER) as (_, adapter, modules, contents):
        variants = {
            'python -c "import torch"': ([sys.executable, "-c", "import torch"], environment),
            "lorpa --help": ([*lorpa, "--help"], environment),
            "lorpa inspect --help": ([*lorpa, "inspect", "--help"], environment),
            "lorpa inspect SMALL_ADAPTER": ([*lorpa, "inspect", str(adapter)], environment),
            "lorpa check SMALL_ADAPTER": ([*lorpa, "check", str(adapter)], environment),
        }
        if args.before is not None:
            before = {**environment, "PYTHONPATH": str(args.before.resolve())}
            variants["before: python -m lorpa.inspect --help"] = (
                [sys.executable, "-m", "lorpa.inspect", "--help"], before)
            variants["before: python -m lorpa.inspect SMALL_ADAPTER"] = (
                [sys.executable, "-m", "lorpa.inspect", str(adapter)], before)
        times = {name: [] for name in variants}
        for _ in range(args.repeats + 1):
            for name, (command, env) in variants.items():
                times[name].append(wall_time(command, env, adapter.parent))
    print(f"small adapter: {modules}, {contents}; OMP_NUM_THREADS=1, {os.cpu_count()} cores, median of "
          f"{args.repeats} interleaved rounds after one dropped warm-up round")
    torch_time = statistics.median(times['python -c "import torch"'][1:])
    print(f"\n{'command':<48}{'wall s':>8}{'vs import torch':>17}")
    for name, values in times.items():
        median = statistics.median(values[1:])
        print(f"{name:<48}{median:>8.2f}{median / torch_time:>17.2f}")


if __name__ == "__main__":
    main()
