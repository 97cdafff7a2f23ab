"""Time and peak memory of `python -m lorpa.prune_adapter` on a LLaMA-2-7B-shaped adapter.

32 layers, hidden 4096, intermediate 11008, LoRA on q/k/v/o/gate/up/down (224 modules), r = 64
pruned to 8; random A and B written as a peft adapter (tensors and config only, no base model).

What a user would otherwise run needs the base model: `lorpa.prune` and peft's own loading both
want the 7B weights in memory, which this benchmark (and the tool) does without. So the reference
is the I/O floor any tool pays: read every tensor with safetensors and write an output of the
pruned size (`load_file` + `save_file` of the first k components). Timings interleave the variants
in this process (median of --repeats); peak memory is measured per variant in fresh processes
(VmHWM above the RSS after imports, so memory-mapped input pages count), --memory_runs times,
since glibc's heap may keep freed blocks from run to run differently (min-max is printed).

    python benchmarks/prune_adapter.py [--dtype fp32|bf16] [--score svd|magnitude] [--repeats 3]
"""

from __future__ import annotations

# First: importing lorpa keeps the lines dependencies log at import time (bitsandbytes' hub kernel) off stderr.
import lorpa  # noqa: F401

# isort: split

import argparse
import contextlib
import multiprocessing
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from lorpa.adapter_files import SAFETENSORS_FILE
from lorpa.prune_adapter import prune_saved_adapter

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def module_shapes(layers: int, hidden: int, intermediate: int):
    """(module name, in_features, out_features) of every linear layer of a LLaMA-2-7B-shaped decoder."""
    for i in range(layers):
        for name in ATTENTION:
            yield f"model.layers.{i}.self_attn.{name}", hidden, hidden
        yield f"model.layers.{i}.mlp.gate_proj", hidden, intermediate
        yield f"model.layers.{i}.mlp.up_proj", hidden, intermediate
        yield f"model.layers.{i}.mlp.down_proj", intermediate, hidden


def write_adapter(folder: Path, args) -> int:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, fan_in, fan_out in module_shapes(args.layers, args.hidden, args.intermediate):
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = (torch.randn(args.r, fan_in, generator=generator)
                                              / fan_in**0.5).to(DTYPES[args.dtype])
        tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, args.r, generator=generator)
                                              / 100).to(DTYPES[args.dtype])
    save_file(tensors, folder / SAFETENSORS_FILE, metadata={"format": "pt"})
    LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=[*ATTENTION, *MLP],
               task_type="CAUSAL_LM").save_pretrained(folder)
    return sum(t.numel() for t in tensors.values())


def run_prune(adapter: Path, output: Path, args, scope: str) -> None:
    prune_saved_adapter(adapter, output, target_rank=args.target_rank, scope=scope, score=args.score)


def run_io_floor(adapter: Path, output: Path, args, scope: str) -> None:
    """Read every tensor, write a file of the pruned size: the least any pruning tool must do."""
    tensors = load_file(adapter / SAFETENSORS_FILE)
    kept = {key: t[: args.target_rank] if ".lora_A." in key else t[:, : args.target_rank].contiguous()
            for key, t in tensors.items()}
    output.mkdir()
    save_file(kept, output / SAFETENSORS_FILE, metadata={"format": "pt"})


VARIANTS = {
    "prune_adapter (module)": (run_prune, "module"),
    "prune_adapter (global)": (run_prune, "global"),
    "I/O floor (read + write)": (run_io_floor, "module"),
}


def status_mib(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def peak_memory(variant: str, adapter: str, args, queue) -> None:
    torch.set_num_threads(1)
    baseline = status_mib("VmRSS")
    function, scope = VARIANTS[variant]
    with tempfile.TemporaryDirectory(dir=Path(adapter).parent) as folder:
        function(Path(adapter), Path(folder) / "out", args, scope)
    queue.put(status_mib("VmHWM") - baseline)


def measure_memory(variant: str, adapter: Path, args) -> float:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=peak_memory, args=(variant, str(adapter), args, queue))
    process.start()
    value = queue.get()
    process.join()
    return value


def adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """The shape of the LLaMA-2-7B-like adapter `write_adapter` writes (shared with inspect_speed.py)."""
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--r", type=int, default=64)


@contextlib.contextmanager
def written_adapter(args):
    """A temporary folder holding the adapter `write_adapter` writes for `args`, and a line describing it:
    (the folder, the adapter inside it, its modules and rank, its size)."""
    with tempfile.TemporaryDirectory() as root:
        adapter = Path(root) / "adapter"
        adapter.mkdir()
        parameters = write_adapter(adapter, args)
        size = (adapter / SAFETENSORS_FILE).stat().st_size / 2**20
        modules = len(list(module_shapes(args.layers, args.hidden, args.intermediate)))
        yield (Path(root), adapter, f"{modules} modules, r={args.r}",
               f"{parameters / 1e6:.0f}M parameters, {args.dtype}, {size:.0f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    adapter_arguments(parser)
    parser.add_argument("--target_rank", type=int, default=8)
    parser.add_argument("--score", default="svd", help="the prune's score (svd: the command's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory_runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with written_adapter(args) as (root, adapter, modules, contents):
        print(f"adapter: {modules} -> {args.target_rank} ({args.score} score), {contents}; "
              f"threads={torch.get_num_threads()}, median of {args.repeats} interleaved runs")
        memory = {variant: [measure_memory(variant, adapter, args) for _ in range(args.memory_runs)]
                  for variant in VARIANTS}
        times = {variant: [] for variant in VARIANTS}
        for _ in range(args.repeats + 1):  # the first round warms the page cache and is dropped
            for variant, (function, scope) in VARIANTS.items():
                output = Path(root) / "out"
                start = time.perf_counter()
                function(adapter, output, args, scope)
                times[variant].append(time.perf_counter() - start)
                shutil.rmtree(output)
        floor = statistics.median(times["I/O floor (read + write)"][1:])
        print(f"\n{'variant':<26}{'wall s':>8}{'vs I/O floor':>14}{'peak RSS MiB (min-max)':>24}")
        for variant, values in times.items():
            median = statistics.median(values[1:])
            peak = f"{min(memory[variant]):.0f}-{max(memory[variant]):.0f}"
            print(f"{variant:<26}{median:>8.2f}{median / floor:>14.2f}{peak:>24}")


if __name__ == "__main__":
    main()
