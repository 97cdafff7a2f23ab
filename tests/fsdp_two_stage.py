"""One process of a 2-process gloo run of `lorpa.train_two_stage` under real FSDP2 (`fully_shard`), launched by
test_two_stage.py via torchrun.

accelerate (1.16) enables FSDP only on accelerators, so on CPU the Trainer would run DDP instead; `FSDP2Trainer`
stands in for it with exactly what the stage loop uses of a Trainer: training the model sharded with
`fully_shard` (each decoder layer, then the whole model), checkpoints of the sharded model and optimizer
(torch.distributed.checkpoint folders named as accelerate names them, trainer_state.json last), and `save_model`
gathering the whole adapter on process 0, as the Trainer's FSDP `save_model` does. The stage loop itself, its
prune through the gathered adapter's files (`lorpa.sharded`) and the re-sharding of the pruned model for stage 2
are the library's own. Each process writes to OUT/process<rank>.json: whether its LoRA parameters were DTensor
shards while training and their local sizes, the kept components, the steps of each stage, and digests of its
shards and (process 0) of the final adapter. Arguments: OUT MODEL_DIR [CHECKPOINT to resume from].
"""

import hashlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from peft import LoraConfig
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, TrainingArguments

import lorpa
from lorpa.distributed import leave_process_group
from lorpa.layers import unwrap


class FSDP2Trainer:
    """What `lorpa.two_stage.StageLoop` needs of a Trainer, on FSDP2."""

    is_fsdp_enabled = True

    def __init__(self, model, args: TrainingArguments, records: dict):
        self.model, self.model_wrapped, self.args, self.records = model, model, args, records
        self.state = SimpleNamespace(global_step=0, log_history=[])
        self.accelerator = SimpleNamespace(wait_for_everyone=dist.barrier, free_memory=lambda: None)
        self.callbacks = []

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def is_world_process_zero(self) -> bool:
        return dist.get_rank() == 0

    def log(self, logs: dict) -> None:
        self.state.log_history.append({**logs, "step": self.state.global_step})
        for callback in self.callbacks:
            callback.on_log(self.args, self.state, None, logs=logs)

    def batch(self, step: int) -> dict:
        """The same tokens for a step whichever run reaches it; each process its own half."""
        ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(1000 + step))
        ids = ids[2 * dist.get_rank(): 2 * dist.get_rank() + 2]
        return {"input_ids": ids, "labels": ids}

    def train(self, resume_from_checkpoint=None) -> None:
        model = self.model
        for layer in unwrap(model).get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        self.records.setdefault("sharded", []).append(all(isinstance(p, DTensor) for p in lora))
        self.records.setdefault("local_elements", []).append(sum(p.to_local().numel() for p in lora))
        self.records.setdefault("global_elements", []).append(sum(p.numel() for p in lora))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        start = 0
        if resume_from_checkpoint is not None:
            state = dict(zip(("model", "optimizer"), get_state_dict(model, optimizer)))
            dcp.load(state, checkpoint_id=str(Path(resume_from_checkpoint, "pytorch_model_fsdp_0")))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
            start = json.loads(Path(resume_from_checkpoint, "trainer_state.json").read_text())["global_step"]
        for step in range(start, self.args.max_steps):
            loss = model(**self.batch(step)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            self.state.global_step = step + 1
            self.log({"loss": loss.item()})
            if self.args.save_steps and self.state.global_step % int(self.args.save_steps) == 0:
                self.save_checkpoint(model, optimizer)
        self.records.setdefault("steps", []).append(self.state.global_step)
        self.records.setdefault("shards", []).append(hashlib.sha256(torch.cat(
            [p.to_local().detach().flatten() for p in lora]).numpy().tobytes()).hexdigest())

    def save_checkpoint(self, model, optimizer) -> None:
        """As accelerate saves a sharded FSDP checkpoint: a distributed-checkpoint folder, then trainer_state.json."""
        folder = Path(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 checkpoint_id=str(folder / "pytorch_model_fsdp_0"))
        if self.is_world_process_zero():
            (folder / "optimizer_0").mkdir(exist_ok=True)  # accelerate's name for the sharded optimizer's folder
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": self.state.global_step}))
        dist.barrier()

    def save_model(self, output_dir: str) -> None:
        """The whole adapter gathered on process 0 and saved there, as the Trainer's FSDP save_model does."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if self.is_world_process_zero():
            unwrap(self.model).save_pretrained(output_dir, state_dict={k: v for k, v in state.items() if "lora_" in k})
        dist.barrier()


def main(out: Path, model_dir: Path, resume: str | None):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    rank = dist.get_rank()
    records = {}
    torch.manual_seed(0)
    model = lorpa.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                 LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"))
    args = TrainingArguments(str(out / "run"), use_cpu=True, max_steps=4, save_strategy="steps", save_steps=1,
                             report_to="none", seed=0, resume_from_checkpoint=resume)
    result = lorpa.train_two_stage(model, lambda m, stage_args: FSDP2Trainer(m, stage_args, records), args,
                                   lorpa.PruneOptions(target_rank=3, score="svd", scope="global"),
                                   stages=lorpa.StageOptions(stage1_ratio=0.5),
                                   make_model=lambda: AutoModelForCausalLM.from_pretrained(model_dir))
    full = get_model_state_dict(result.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    lora = sorted(k for k in full if "lora_" in k)
    records.update(kept={name: m.kept for name, m in result.prune_report.modules.items()},
                   ranks=result.prune_report.ranks, fresh_model=result.model is not model,
                   final=hashlib.sha256(torch.cat([full[k].flatten() for k in lora]).numpy().tobytes()).hexdigest()
                   if rank == 0 else None)
    (out / f"process{rank}.json").write_text(json.dumps(records))
    # Both stages' sharded models hold the process group and gloo's work on it: released while the group is alive,
    # else the group outlives the interpreter and gloo's threads abort it at exit (SIGABRT).
    del model, result, full
    leave_process_group()


if __name__ == "__main__":
    os.environ.setdefault("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch` with an FSDP config sets it
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
