"""Training-step time and peak memory: pruned LoRPA vs LoRA r=8 vs LoRA r=256 vs full fine-tuning.

Also the cost of tracking sensitivity (`--prune_score sensitivity`) during stage 1: LoRA r=256 with
`lorpa.update_sensitivity` before each optimizer step, as `SensitivityCallback` does, against plain r=256.

All variants share one RoBERTa-base-shaped model with random weights (the cost of a step does not
depend on the weights). The LoRPA variant is pruned 256 -> 8, saved, and loaded back from its
adapter with plain peft, exactly as stage 2 or a user sees it. Steps are interleaved round-robin
so machine noise hits every variant alike; medians are reported as ratios against LoRA r=8.
Peak memory is measured per variant in a fresh process (CPU: peak RSS above the imports; GPU: max allocated).
A second table compares dynamic padding with padding to 512 (the authors' scripts) on SST-2
sentence lengths: the GLUE SST-2 validation sentences from the hub, or from a local copy with
--data_dir DIR (DIR/glue/sst2/validation.jsonl, the layout run_glue.py --data_dir reads).

    python benchmarks/step_time.py [--steps 8] [--batch_size 16] [--seq_len 128] [--size base] [--data_dir DIR]
"""

from __future__ import annotations

# First: importing lorpa keeps the lines dependencies log at import time (bitsandbytes' hub kernel) off stderr.
import lorpa

# isort: split

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import RobertaConfig, RobertaForSequenceClassification

SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
}
VARIANTS = ("lorpa 256->8", "lora r=8", "lora r=256", "full", "r=256 +sens")


def base_model(size: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, num_labels=2, **SIZES[size])
    return RobertaForSequenceClassification(config)


def lora(model, r):
    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=r, target_modules=["query", "value"]))


def build(variant: str, size: str) -> torch.nn.Module:
    if variant == "full":
        return base_model(size)
    if variant == "lora r=8":
        return lora(base_model(size), 8)
    if variant in ("lora r=256", "r=256 +sens"):
        return lora(base_model(size), 256)
    model = lora(base_model(size), 256)
    lorpa.prune(model, target_rank=8)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return PeftModel.from_pretrained(base_model(size), folder, is_trainable=True)


class Stepper:
    """One model with its optimizer, taking full training steps (forward, backward, AdamW)."""

    def __init__(self, model, device, track_sensitivity=False):
        self.model = model.to(device).train()
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        self.device = device
        self.track_sensitivity = track_sensitivity

    def step(self, batch) -> float:
        start = time.perf_counter()
        loss = self.model(**batch).loss
        loss.backward()
        if self.track_sensitivity:
            lorpa.update_sensitivity(self.model)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def random_batch(batch_size, seq_len, device, lengths=None):
    ids = torch.randint(3, 50000, (batch_size, seq_len), device=device)
    mask = torch.ones_like(ids)
    if lengths is not None:
        for row, length in enumerate(lengths):
            mask[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch_size,), device=device)}


def interleaved_medians(runs: dict[str, tuple[Stepper, list]], steps: int) -> dict[str, float]:
    """Median step time per run, taking one step of each run in turn."""
    times = {name: [] for name in runs}
    for stepper, batches in runs.values():
        stepper.step(batches[0])  # warm-up
    for i in range(steps):
        for name, (stepper, batches) in runs.items():
            times[name].append(stepper.step(batches[i % len(batches)]))
    return {name: statistics.median(values) for name, values in times.items()}


def status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process. (ru_maxrss would not do: it keeps the peak of the forking parent.)"""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def peak_memory(variant, size, batch_size, seq_len, device_name, queue):
    """Peak memory of building and training one variant, above what the imports alone hold."""
    device = torch.device(device_name)
    baseline = status_mib("VmRSS")
    stepper = Stepper(build(variant, size), device, track_sensitivity="sens" in variant)
    batch = random_batch(batch_size, seq_len, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        stepper.step(batch)
    if device.type == "cuda":
        queue.put(torch.cuda.max_memory_allocated() / 2**20)
    else:
        queue.put(status_mib("VmHWM") - baseline)


def measure_memory(variant, args, device_name) -> float:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=peak_memory,
                              args=(variant, args.size, args.batch_size, args.seq_len, device_name, queue))
    process.start()
    value = queue.get()
    process.join()
    return value


def sst2_sentences(data_dir: str | None) -> list[str]:
    """SST-2 validation sentences: a local copy under DATA_DIR, else the hub's GLUE SST-2."""
    from datasets import load_dataset

    from lorpa.errors import InputError
    from lorpa.tasks.glue import GlueDataArguments, load_glue

    if data_dir is not None:
        try:
            return load_glue(GlueDataArguments(task_name="sst2", data_dir=data_dir))["validation"]["sentence"]
        except InputError as error:
            raise SystemExit(f"error: {error}") from None
    try:
        return load_dataset("nyu-mll/glue", "sst2", split="validation")["sentence"]
    except Exception as error:  # offline, hub errors: several exception types
        raise SystemExit(f"error: SST-2 could not be loaded from the hub ({type(error).__name__}); "
                         "pass --data_dir DIR with DIR/glue/sst2/validation.jsonl, or --skip_padding") from None


def sst2_lengths(sentences: list[str], batch_size: int, batches: int) -> list[list[int]]:
    """Token counts of real SST-2 sentences (about 1.3 tokens per word plus 2 specials), in batches."""
    import random

    words = [len(sentence.split()) for sentence in sentences]
    rng = random.Random(0)
    return [[min(512, int(rng.choice(words) * 1.3) + 2) for _ in range(batch_size)] for _ in range(batches)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--size", choices=SIZES, default="base")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--skip_padding", action="store_true")
    parser.add_argument("--data_dir", default=None,
                        help="folder with local GLUE copies (DIR/glue/sst2/validation.jsonl); default: the hub")
    args = parser.parse_args()
    sentences = None if args.skip_padding else sst2_sentences(args.data_dir)  # fail before the long part
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device={device}, threads={torch.get_num_threads()}, size={args.size}, "
          f"batch={args.batch_size}x{args.seq_len}, median of {args.steps} interleaved steps")

    memory = {} if args.skip_memory else {v: measure_memory(v, args, device.type) for v in VARIANTS}
    steppers = {variant: Stepper(build(variant, args.size), device, "sens" in variant) for variant in VARIANTS}
    batches = [random_batch(args.batch_size, args.seq_len, device) for _ in range(2)]
    medians = interleaved_medians({name: (stepper, batches) for name, stepper in steppers.items()}, args.steps)
    unit = "MiB max allocated" if device.type == "cuda" else "MiB peak RSS over imports"
    print(f"\n{'variant':<14}{'trainable':>12}{'step s':>9}{'vs lora r=8':>13}" + (f"{unit:>22}" if memory else ""))
    for variant, stepper in steppers.items():
        trainable = sum(p.numel() for p in stepper.model.parameters() if p.requires_grad)
        line = f"{variant:<14}{trainable:>12,}{medians[variant]:>9.3f}{medians[variant] / medians['lora r=8']:>13.3f}"
        print(line + (f"{memory[variant]:>22.0f}" if memory else ""))
    total = 0.2 * medians["lora r=256"] + 0.8 * medians["lorpa 256->8"]
    print(f"\nwhole lorpa run (20% of steps at r=256, 80% pruned) vs lora r=8 run: {total / medians['lora r=8']:.3f}")
    print(f"sensitivity tracking: r=256 +sens vs lora r=256 step: "
          f"{medians['r=256 +sens'] / medians['lora r=256']:.3f}")

    if not args.skip_padding:
        lengths = sst2_lengths(sentences, args.batch_size, 4)
        dynamic = [random_batch(args.batch_size, max(batch), device, batch) for batch in lengths]
        padded = [random_batch(args.batch_size, 512, device, batch) for batch in lengths]
        stepper = steppers["lora r=8"]
        medians = interleaved_medians({"dynamic": (stepper, dynamic), "pad to 512": (stepper, padded)}, args.steps)
        longest = statistics.mean(max(batch) for batch in lengths)
        print(f"\npadding (lora r=8, SST-2 lengths, mean longest in batch {longest:.0f} tokens)")
        print(f"dynamic {medians['dynamic']:.3f} s/step, pad to 512 {medians['pad to 512']:.3f} s/step, "
              f"ratio {medians['pad to 512'] / medians['dynamic']:.1f}x")


if __name__ == "__main__":
    main()
