"""Time `lorpa.prune` on RoBERTa-large-shaped adapters against a per-rank Python loop.

24 layers, hidden 1024, LoRA on query/value, r0 = 256 pruned to 8. The adapters are built on bare
linear layers (the frozen backbone plays no part in pruning), so the benchmark needs no weights.

    python benchmarks/prune_speed.py [--repeats 5]
"""

import argparse
import copy
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lorpa


class AttentionStack(nn.Module):
    def __init__(self, layers=24, hidden=1024):
        super().__init__()
        self.layer = nn.ModuleList(
            nn.ModuleDict({"query": nn.Linear(hidden, hidden), "value": nn.Linear(hidden, hidden)}) for _ in range(layers)
        )


def loop_prune(model, target_rank):
    """The straightforward version: one outer product per rank, a Python sort, rebuilt factors."""
    for layer in lorpa.lora_layers(model).values():
        lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
        scores = [torch.outer(lora_B.weight[:, i], lora_A.weight[i]).abs().sum().item() for i in range(lora_A.weight.shape[0])]
        kept = sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:target_rank])
        lora_A.weight = nn.Parameter(lora_A.weight.detach()[kept].clone())
        lora_B.weight = nn.Parameter(lora_B.weight.detach()[:, kept].clone())
    return kept


def timed(fn, model, repeats):
    times = []
    for _ in range(repeats):
        fresh = copy.deepcopy(model)
        start = time.perf_counter()
        fn(fresh)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="more threads only add contention on these small ops")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LoraConfig(r=256, lora_alpha=256, target_modules=["query", "value"], init_lora_weights=False)
    model = get_peft_model(AttentionStack(), config)

    ours = timed(lambda m: lorpa.prune(m, target_rank=8), model, args.repeats)
    loop = timed(lambda m: loop_prune(m, 8), model, args.repeats)
    print(f"modules: {len(lorpa.lora_layers(model))}, r0=256 -> 8, threads={args.threads}, median of {args.repeats}")
    print(f"lorpa.prune      {ours * 1000:9.1f} ms")
    print(f"per-rank loop    {loop * 1000:9.1f} ms")
    print(f"speed-up         {loop / ours:9.1f}x")


if __name__ == "__main__":
    main()
