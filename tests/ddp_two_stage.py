"""One process of a 2-process gloo DDP run of `lorpa.train_two_stage`, launched by test_two_stage.py via torchrun.

Pruning uses the random score seeded with the process rank, so processes that chose on their own
would keep different components. Each process writes what it kept and a digest of its final
adapter weights to OUT/process<rank>.json.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import lorpa


class LoggingTrainer(Trainer):
    """A user's own Trainer subclass."""


def main(out: Path):
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model = lorpa.get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"))
    ids = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(1)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(str(out / "run"), use_cpu=True, max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    worlds = []

    def make_trainer(model, stage_args):
        trainer = LoggingTrainer(model=model, args=stage_args, train_dataset=data)
        worlds.append(trainer.args.world_size)
        return trainer

    result = lorpa.train_two_stage(model, make_trainer, args, target_rank=2, score="random", seed=rank)
    weights = torch.cat([p.detach().flatten() for n, p in result.model.named_parameters() if "lora_" in n])
    record = {
        "world_sizes": worlds,
        "kept": {name: module.kept for name, module in result.prune_report.modules.items()},
        "ranks": result.prune_report.ranks,
        "steps": result.trainer.state.global_step,
        "weights": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
        "trained": bool(any(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)),
    }
    (out / f"process{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
