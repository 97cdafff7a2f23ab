"""Time `python -m lorpa.inspect` on a LLaMA-2-7B-shaped all-linear adapter at r = 64, against reading its files.

The adapter (224 modules, random A and B, written by `benchmarks/prune_adapter.py`'s writer) has no base model:
`inspect` needs none. Its reference is the floor any spectrum tool pays, reading every byte of the file; the
rest is one module's QR and r × r SVD at a time, and the budgets over all modules. Variants interleave in this
process, the first round (it warms the page cache) is dropped, medians of --repeats.

    python benchmarks/inspect_speed.py [--dtype fp32|bf16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lorpa.adapter_files import SAFETENSORS_FILE
from lorpa.inspect import inspect_adapter
from prune_adapter import adapter_arguments, written_adapter


def read_files(adapter: Path) -> None:
    """Every byte of the weights file into memory: the I/O any tool that looks at each tensor pays."""
    (adapter / SAFETENSORS_FILE).read_bytes()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    adapter_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with written_adapter(args) as (_, adapter, modules, contents):
        print(f"adapter: {modules}, {contents}; threads=1, median of {args.repeats} interleaved runs after one "
              "dropped warm-up round")
        variants = {"lorpa.inspect": lambda: inspect_adapter(adapter),
                    "read the weights file": lambda: read_files(adapter)}
        times = {name: [] for name in variants}
        for _ in range(args.repeats + 1):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        floor = statistics.median(times["read the weights file"][1:])
        for name, values in times.items():
            median = statistics.median(values[1:])
            print(f"  {name:<44}{median:8.2f} s  {median / floor:6.2f}x reading the files")


if __name__ == "__main__":
    main()
