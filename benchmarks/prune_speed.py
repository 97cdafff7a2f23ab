"""Time `lorpa.prune` against the authors' released `prune()`, re-implemented with its complexity.

Two adapter shapes, r0 = 256 pruned to 8 in every module:

- RoBERTa-large: 24 layers, hidden 1024, LoRA on query/value (48 square modules), the paper's setting.
- LLaMA-7B: 32 layers, hidden 4096, MLP 11008, LoRA on every linear layer (q/k/v/o, gate/up/down:
  224 modules, 96 of them not square).

The authors' score pairs output j with input j, so it is defined only on square layers (on the
others their code fails with a shape error). On LLaMA their `prune()` is therefore timed on the 128
square attention modules, against `lorpa.prune` on the same modules; `lorpa.prune` on all 224 modules
is timed as well. Every comparison checks that the kept components agree with
`lorpa.prune(score="elementwise")`: they must, except on exact score ties, where the authors' unstable
argsort may keep other indices (reported, never hidden).

The singular-basis prune (`score="svd"`) is timed against peft's `convert_to_lora`, the SVD truncation
a peft user would run on a trained adapter: it forms each out x in update and takes its full SVD,
where `lorpa.prune` works on the r0-sized factors. Both must keep the same update (checked).

The output-space prune (`score="activation"`) is timed beside svd on the same adapters, with a recorded
calibration G per module (its values do not change the cost), and its calibration pass, which needs a
real forward, on a RoBERTa-base-shaped model (LoRA r0 on query/value, random weights, 8 batches of
16 x 128 tokens) against a plain forward of the same batches.

The adapters sit on linear layers whose frozen weights are zero-stride views of one element (pruning
never reads them), so the LLaMA shape needs no 26 GB backbone; the adapters alone hold about 2.5 GB.

    python benchmarks/prune_speed.py [--repeats 5] [--shapes roberta-large llama-7b] [--svd_repeats 3]
"""

from __future__ import annotations

# First: importing lorpa keeps the lines dependencies log at import time (bitsandbytes' hub kernel) off stderr.
import lorpa

# isort: split

import argparse
import copy
import statistics
import time
import warnings

import torch
from peft import LoraConfig, convert_to_lora, get_peft_model
from torch import nn

import lorpa.plan
from lorpa.calibration import CALIBRATION_ATTR, LayerCalibration
from lorpa.layers import lora_layers

R0, TARGET = 256, 8
SHAPES = {
    "roberta-large": dict(layers=24, modules={"query": (1024, 1024), "value": (1024, 1024)}),
    "llama-7b": dict(layers=32, modules={
        "q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
        "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096),
    }),
    "tiny": dict(layers=1, modules={  # LLaMA's seven projections at a size that prunes in milliseconds
        # (a check, not a figure)
        "q_proj": (512, 512), "k_proj": (512, 512), "v_proj": (512, 512), "o_proj": (512, 512),
        "gate_proj": (512, 1024), "up_proj": (512, 1024), "down_proj": (1024, 512),
    }),
}


class FrozenLinear(nn.Linear):
    """A linear layer of the given shape whose weight takes no memory (pruning never reads it)."""

    def __init__(self, in_features: int, out_features: int, device="cpu"):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(1, device=device).expand(out_features, in_features),
                                   requires_grad=False)
        self.bias = None


class Stack(nn.Module):
    def __init__(self, layers: int, modules: dict[str, tuple[int, int]], device="cpu"):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({name: FrozenLinear(i, o, device) for name, (i, o) in modules.items()})
            for _ in range(layers)
        )


def authors_prune(model, target_rank: int, adapter_name: str = "default") -> dict[str, list[int]]:
    """The authors' released `prune()`, step by step: one Python call per rank for the element-wise score,
    an unstable `torch.argsort` for the pruned set, `not in` over that tensor for the kept list,
    `index_select` into `weight.data`. Like theirs it leaves `layer.r`, `scaling` and the config at r0."""
    kept_sets = {}
    for name, layer in lora_layers(model, adapter_name).items():
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        rank = lora_A.weight.shape[0]
        scores = [torch.sum(torch.abs(lora_B.weight[:, r] * lora_A.weight[r, :])) for r in range(rank)]
        pruned = torch.argsort(torch.stack(scores))[: rank - target_rank]
        kept = [i for i in range(rank) if i not in pruned]
        index = torch.tensor(kept)
        lora_A.weight.data = torch.index_select(lora_A.weight.data, 0, index)
        lora_B.weight.data = torch.index_select(lora_B.weight.data, 1, index)
        kept_sets[name] = kept
    return kept_sets


def build(shape: str, targets: list[str], device="cpu", layers: int | None = None):
    """The shape's adapter at r0 (peft puts the factors on the frozen weights' device); `layers` keeps the
    first few."""
    torch.manual_seed(0)
    config = LoraConfig(r=R0, lora_alpha=R0, target_modules=targets, init_lora_weights=False)
    spec = dict(SHAPES[shape], **({} if layers is None else {"layers": layers}))
    return get_peft_model(Stack(**spec, device=device), config)


def synchronize(model) -> None:
    """Wait for the GPU (a no-op on CPU), so that a timer measures the work and not its launch."""
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def time_variants(model, variants: dict, repeats: int) -> tuple[dict[str, float], dict[str, dict]]:
    """Median seconds per variant, the variants taking turns on fresh copies; and each one's kept sets."""
    times, kept = {name: [] for name in variants}, {}
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}  # shared, never copied
    for _ in range(repeats):
        for name, fn in variants.items():
            fresh = copy.deepcopy(model, memo=dict(frozen))
            synchronize(fresh)
            start = time.perf_counter()
            kept[name] = fn(fresh)
            synchronize(fresh)
            times[name].append(time.perf_counter() - start)
            del fresh
    return {name: statistics.median(values) for name, values in times.items()}, kept


def lorpa_kept(score: str):
    return lambda m: {n: p.kept for n, p in lorpa.prune(m, target_rank=TARGET, score=score).modules.items()}


def without_error_measure(m):
    """lorpa.prune magnitude with the report's relative_error (the r0 x r0 Gram matrices of A and B per
    module, which the authors' code does not compute) left out: what choosing and cutting alone cost."""
    gram, error = lorpa.plan.weight_gram, lorpa.plan.kept_error
    lorpa.plan.weight_gram = lambda lora_A, lora_B: torch.zeros(1)
    lorpa.plan.kept_error = lambda *args: 0.0
    try:
        return lorpa_kept("magnitude")(m)
    finally:
        lorpa.plan.weight_gram, lorpa.plan.kept_error = gram, error


def tied_modules(model) -> int:
    """Modules whose elementwise score has an exact tie at the pruning boundary."""
    count = 0
    for scores in lorpa.rank_scores(model, "elementwise").values():
        ordered = torch.sort(scores, descending=True).values
        count += bool(ordered[TARGET - 1] == ordered[TARGET])
    return count


def compare(title: str, model, repeats: int, extra: dict | None = None) -> None:
    variants = {"lorpa.prune magnitude": lorpa_kept("magnitude"), "lorpa.prune elementwise": lorpa_kept("elementwise"),
                "lorpa.prune magnitude, no relative_error": without_error_measure,
                "authors' prune()": lambda m: authors_prune(m, TARGET), **(extra or {})}
    medians, kept = time_variants(model, variants, repeats)
    modules = len(kept["authors' prune()"])
    differ = [n for n in kept["authors' prune()"]
              if sorted(kept["authors' prune()"][n]) != kept["lorpa.prune elementwise"][n]]
    ties = tied_modules(model)
    print(f"\n{title}: {modules} modules, r0={R0} -> {TARGET}")
    reference = medians["authors' prune()"]
    for name, seconds in medians.items():
        speed = "" if name == "authors' prune()" else f"  {reference / seconds:6.1f}x (authors' time / this)"
        print(f"  {name:<42}{seconds * 1000:9.1f} ms{speed}")
    print(f"  kept components equal to lorpa.prune elementwise in {modules - len(differ)}/{modules} modules "
          f"({ties} modules have an exact score tie at the cut)")


def peft_svd(model) -> dict[str, torch.Tensor]:
    """peft's conversion to a rank-TARGET LoRA; its scaling is 1, so each update is B @ A."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes that converting a LoRA adapter to LoRA is unusual
        _, state = convert_to_lora(model, rank=TARGET)
    return {name: state[f"base_model.model.{name}.lora_B.weight"] @ state[f"base_model.model.{name}.lora_A.weight"]
            for name in lora_layers(model)}


def lorpa_svd(model) -> dict[str, torch.Tensor]:
    lorpa.prune(model, target_rank=TARGET, score="svd")
    return {name: layer.get_delta_weight("default").detach() for name, layer in lora_layers(model).items()}


def with_calibration(model) -> None:
    """A recorded G on every LoRA layer, as `lorpa.calibrate` leaves it (random positive semi-definite: the cost
    of the truncation does not depend on it)."""
    generator = torch.Generator().manual_seed(0)
    for layer in lora_layers(model).values():
        z = torch.randn(R0, 2 * R0, generator=generator, dtype=torch.float64).to(layer.lora_A["default"].weight.device)
        layer.__dict__.setdefault(CALIBRATION_ATTR, {})["default"] = LayerCalibration(z @ z.t(), 2 * R0)


def compare_output_space(title: str, model, repeats: int) -> None:
    with_calibration(model)
    medians, _ = time_variants(model, {"lorpa.prune svd": lorpa_kept("svd"),
                                       "lorpa.prune activation": lorpa_kept("activation")}, repeats)
    print(f"\n{title}: {len(lora_layers(model))} modules, r0={R0} -> {TARGET}, singular basis against output basis")
    for name, seconds in medians.items():
        print(f"  {name:<42}{seconds * 1000:9.1f} ms  {seconds / medians['lorpa.prune svd']:6.2f}x svd's time")


def compare_calibration(repeats: int, batches: int = 8, batch_size: int = 16, length: int = 128) -> None:
    """The calibration pass against a plain forward of the same batches, on a RoBERTa-base shape with LoRA r0."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    base = RobertaForSequenceClassification(RobertaConfig(vocab_size=50265, max_position_embeddings=514, num_labels=2))
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=R0, lora_alpha=R0,
                                            target_modules=["query", "value"])).eval()
    generator = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(3, 50000, (batch_size, length), generator=generator),
             "attention_mask": torch.ones(batch_size, length, dtype=torch.long)} for _ in range(batches)]

    def forward():
        with torch.no_grad():
            for batch in data:
                model(**batch)

    times = {"plain forward": [], "lorpa.calibrate": []}
    for _ in range(repeats):
        for name, run in (("plain forward", forward), ("lorpa.calibrate", lambda: lorpa.calibrate(model, data))):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\ncalibration pass, RoBERTa-base shape, LoRA r0={R0} on query/value, "
          f"{batches} batches of {batch_size}x{length}:")
    for name, seconds in medians.items():
        print(f"  {name:<42}{seconds * 1000:9.1f} ms  {seconds / medians['plain forward']:6.2f}x a plain forward")


def compare_svd(title: str, model, repeats: int) -> None:
    medians, deltas = time_variants(model, {"peft convert_to_lora": peft_svd, "lorpa.prune svd": lorpa_svd}, repeats)
    ours, theirs = deltas["lorpa.prune svd"], deltas["peft convert_to_lora"]
    worst = max(float(torch.linalg.norm(ours[n] - theirs[n]) / torch.linalg.norm(theirs[n])) for n in ours)
    print(f"\n{title}: {len(ours)} modules, r0={R0} -> {TARGET}, singular basis")
    reference = medians["peft convert_to_lora"]
    for name, seconds in medians.items():
        speed = "" if name == "peft convert_to_lora" else f"  {reference / seconds:6.1f}x (peft's time / this)"
        print(f"  {name:<42}{seconds * 1000:9.1f} ms{speed}")
    print(f"  kept update equal to peft's: largest relative difference {worst:.1e} over the modules")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="more threads only add contention on these small ops")
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--svd_repeats", type=int, default=3,
                        help="repeats of the svd comparison (RoBERTa-large shape only: peft's dense SVDs of the "
                             "LLaMA-7B shape take many minutes); 0 skips it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}, median of {args.repeats} interleaved repeats, fp32 adapters with random A and B")
    if "roberta-large" in args.shapes:
        roberta = build("roberta-large", ["query", "value"])
        compare("RoBERTa-large shape, query/value", roberta, args.repeats)
        if args.svd_repeats:
            compare_svd("RoBERTa-large shape, query/value", roberta, args.svd_repeats)
        compare_output_space("RoBERTa-large shape, query/value", roberta, args.repeats)
        compare_calibration(args.repeats)
    if "llama-7b" in args.shapes:
        square = ["q_proj", "k_proj", "v_proj", "o_proj"]
        compare("LLaMA-7B shape, square attention modules q/k/v/o", build("llama-7b", square), args.repeats)
        everything = build("llama-7b", list(SHAPES["llama-7b"]["modules"]))
        medians, kept = time_variants(everything, {"lorpa.prune magnitude": lorpa_kept("magnitude")}, args.repeats)
        print(f"\nLLaMA-7B shape, all linear layers: {len(kept['lorpa.prune magnitude'])} modules, "
              f"r0={R0} -> {TARGET}")
        print(f"  {'lorpa.prune magnitude':<28}{medians['lorpa.prune magnitude'] * 1000:9.1f} ms  "
              "(the authors' score and lorpa's elementwise are undefined on the 96 non-square modules)")
        compare_output_space("LLaMA-7B shape, all linear layers", everything, args.repeats)


if __name__ == "__main__":
    main()
