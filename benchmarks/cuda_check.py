"""The CUDA path in one script: bf16 training steps, prune time and QLoRA, measured side by side in one process.

No hub access and no weights: every model is random-initialised from a config of a real shape (the cost of a
step or a prune does not depend on the values). Three parts, each printing ratios against its baseline:

1. Step time and peak memory in bf16 on a LLaMA-3.2-1B-shaped model with LoRA on every linear layer: LoRPA's
   stage 1 (LoRA at r0 = 256), its stage 2 (the r0 adapter pruned to 16 by `lorpa.prune`, saved and reloaded
   with plain peft, as stage 2 trains it) and peft LoRA at rank 16. Steps interleave round-robin (forward,
   backward, AdamW); medians. Goal: the pruned stage costs at most 1.03x LoRA at the same rank.
2. Prune time of a LLaMA-7B-shaped all-linear adapter (224 modules, r0 = 256 -> 8) on the GPU: the authors'
   `prune()` (square modules only, where their score is defined), `lorpa.prune` magnitude and svd with the
   report's error measurement, and peft's `convert_to_lora` (dense SVD per module) on the first layers.
3. QLoRA end to end, when bitsandbytes is installed: a 4-bit base (nf4, double quantisation, bf16 compute),
   LoRA on top trained a few steps, pruned, saved, reloaded with plain peft onto a freshly quantised base,
   with equal outputs.

    python benchmarks/cuda_check.py [--json results.json]     # on one GPU, in under 8 minutes
    python benchmarks/cuda_check.py --tiny                    # tiny shapes on CPU: the same code, in seconds
"""

from __future__ import annotations

# First: importing lorpa keeps the lines dependencies log at import time (bitsandbytes' hub kernel) off stderr.
import lorpa

# isort: split

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lorpa.layers import lora_layers  # noqa: E402

import prune_speed  # noqa: E402  (the authors' prune and the adapter stand-ins, shared with benchmarks/prune_speed.py)

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decoder(shape: dict, device, dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no 1B-parameter copy through the CPU
        return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).to(dtype=dtype)


def with_lora(model, rank: int):
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank,
                                            target_modules="all-linear"))


def pruned_stage(shape, device, dtype, r0: int, rank: int):
    """Stage 2 as the run scripts train it: the r0 adapter pruned, saved, and reloaded with plain peft."""
    model = with_lora(decoder(shape, device, dtype), r0)
    lorpa.prune(model, target_rank=rank, score="svd")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        return PeftModel.from_pretrained(decoder(shape, device, dtype), folder, is_trainable=True)


class Stepper:
    """One variant with its optimizer, taking full training steps (forward, backward, AdamW)."""

    def __init__(self, model):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(self, ids) -> None:
        self.model(input_ids=ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def step_times(shape, device, dtype, r0, rank, batch, length, steps) -> dict:
    """Median step seconds of each variant (steps interleaved round-robin) and its peak memory (measured alone)."""
    builders = {f"LoRPA stage 1 (LoRA r={r0})": lambda: with_lora(decoder(shape, device, dtype), r0),
                f"LoRPA stage 2 ({r0}->{rank}, reloaded)": lambda: pruned_stage(shape, device, dtype, r0, rank),
                f"peft LoRA r={rank}": lambda: with_lora(decoder(shape, device, dtype), rank)}
    ids = torch.randint(0, shape["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1)).to(device)
    peaks = {}
    for name, build in builders.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        stepper = Stepper(build())
        for _ in range(2):
            stepper.step(ids)
        synchronize(device)
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        del stepper
    steppers = {name: Stepper(build()) for name, build in builders.items()}
    for stepper in steppers.values():  # warm-up: kernels chosen, optimizer state allocated
        stepper.step(ids)
    times = {name: [] for name in builders}
    for _ in range(steps):
        for name, stepper in steppers.items():
            synchronize(device)
            start = time.perf_counter()
            stepper.step(ids)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    baseline = medians[f"peft LoRA r={rank}"]
    return {name: {"step_s": medians[name], "ratio_to_lora": medians[name] / baseline, "peak_gib": peaks[name]}
            for name in medians}


def prune_times(shape: str, device, peft_layers: int, repeats: int) -> dict:
    """lorpa.prune (with its error measurement) against the authors' prune and peft's convert_to_lora, same device."""
    square = ["q_proj", "k_proj", "v_proj", "o_proj"]
    everything = list(prune_speed.SHAPES[shape]["modules"])
    results = {}
    model = prune_speed.build(shape, square, device)
    medians, _ = prune_speed.time_variants(model, {
        "authors' prune() (square modules)": lambda m: prune_speed.authors_prune(m, prune_speed.TARGET),
        "lorpa.prune magnitude (square modules)": prune_speed.lorpa_kept("magnitude")}, repeats)
    results.update(medians)
    del model
    model = prune_speed.build(shape, everything, device)
    medians, _ = prune_speed.time_variants(
        model, {"lorpa.prune magnitude (all modules)": prune_speed.lorpa_kept("magnitude"),
                "lorpa.prune svd (all modules)": prune_speed.lorpa_kept("svd")}, repeats)
    results.update(medians)
    del model
    model = prune_speed.build(shape, everything, device, peft_layers)
    medians, deltas = prune_speed.time_variants(model, {"peft convert_to_lora": prune_speed.peft_svd,
                                                        "lorpa.prune svd": prune_speed.lorpa_svd}, 1)
    worst = max(float(torch.linalg.norm(deltas["lorpa.prune svd"][n] - deltas["peft convert_to_lora"][n])
                      / torch.linalg.norm(deltas["peft convert_to_lora"][n])) for n in deltas["lorpa.prune svd"])
    results.update({f"{name} (first {peft_layers} layers)": seconds for name, seconds in medians.items()})
    results["svd: largest relative difference from peft"] = worst
    return results


def qlora_round_trip(shape, device) -> dict:
    """4-bit base, LoRA trained 3 steps, pruned, saved, reloaded on a freshly quantised base: equal outputs."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return {"skipped": "bitsandbytes is not installed (pip install 'lorpa[qlora]')"}
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantisation = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as folder:
        decoder(shape, torch.device("cpu"), torch.bfloat16).save_pretrained(folder)

        def base():
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantisation,
                                                         device_map={"": str(device)})
            return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

        started = time.perf_counter()
        model = lorpa.get_peft_model(base(), LoraConfig(task_type="CAUSAL_LM", r=32, lora_alpha=64,
                                                        target_modules="all-linear"))
        ids = torch.randint(0, shape["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(2)).to(device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        report = lorpa.prune(model, target_rank=8, score="svd", scope="global")
        model.eval()
        with torch.no_grad():
            before = model(input_ids=ids).logits
        model.save_pretrained(Path(folder, "adapter"))
        reloaded = PeftModel.from_pretrained(base(), Path(folder, "adapter")).eval()
        with torch.no_grad():
            after = reloaded(input_ids=ids).logits
        return {"layer type": type(next(iter(lora_layers(model).values()))).__module__,
                "mean relative error of the prune": report.mean_relative_error,
                "largest output difference after reload": float((before - after).abs().max()),
                "seconds": time.perf_counter() - started}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes on CPU (what the tests run), not a measurement")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 10, tiny: 2)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run it on a GPU, or with --tiny for the CPU check")
    device = torch.device("cpu" if args.tiny else "cuda")
    shape, steps = (TINY, args.steps or 2) if args.tiny else (LLAMA_1B, args.steps or 10)
    hardware = "CPU (tiny shapes)" if args.tiny else torch.cuda.get_device_name()
    print(f"device: {hardware}; torch {torch.__version__}", flush=True)
    results = {"device": hardware}

    r0, rank = (16, 4) if args.tiny else (256, 16)
    batch, length = (2, 16) if args.tiny else (4, 512)
    results["step time, bf16"] = step_times(shape, device, torch.bfloat16, r0, rank, batch, length, steps)
    print(f"\n1. training step, bf16, {'tiny' if args.tiny else 'LLaMA-3.2-1B'} shape, all-linear LoRA, batch "
          f"{batch}x{length}, median of {steps} interleaved steps:")
    for name, figures in results["step time, bf16"].items():
        peak = "" if figures["peak_gib"] is None else f", peak {figures['peak_gib']:.2f} GiB"
        print(f"   {name:<36} {figures['step_s'] * 1000:8.1f} ms  {figures['ratio_to_lora']:.3f}x LoRA r={rank}{peak}")

    results["prune time"] = prune_times("tiny" if args.tiny else "llama-7b", device, 1 if args.tiny else 2,
                                        1 if args.tiny else 3)
    print(f"\n2. prune, {'tiny LLaMA-like' if args.tiny else 'LLaMA-7B'}-shaped all-linear adapter, "
          f"r0 {prune_speed.R0} -> {prune_speed.TARGET}, with the report's error measurement:")
    authors = results["prune time"]["authors' prune() (square modules)"]
    for name, value in results["prune time"].items():
        if name.startswith("svd:"):
            print(f"   {name}: {value:.1e}")
        else:
            print(f"   {name:<48} {value * 1000:9.1f} ms" + (f"  ({authors / value:.1f}x faster than the authors')"
                                                           if "square" in name and "authors" not in name else ""))

    results["qlora"] = qlora_round_trip(shape, device)
    print("\n3. QLoRA round trip:", json.dumps(results["qlora"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
