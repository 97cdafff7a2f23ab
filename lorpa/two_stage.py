"""Two-stage LoRPA in anyone's training script: train at r0, prune, retrain with a fresh Trainer.

    model = lorpa.get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=256, lora_alpha=256))
    result = lorpa.train_two_stage(
        model,
        lambda model, args: SFTTrainer(model=model, args=args, train_dataset=data),  # or any Trainer
        SFTConfig(output_dir="out", num_train_epochs=3),                            # the whole run
        target_rank=8,
    )
    result.trainer.save_model("out")                                             # a standard peft adapter

Stage 2 needs its own Trainer: pruning replaces the LoRA parameters, so stage 1's optimizer, LR
schedule and DDP / accelerate wrapper all hold tensors that no longer exist. `make_trainer` builds
a Trainer for the model it is given (the pruned one in stage 2), which wraps it afresh. Under DDP
every process calls `train_two_stage` as it would call `trainer.train()`; `prune` makes every
process keep rank 0's components.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .cli import UsageError
from .layers import lora_layers, resolve_adapter, unwrap
from .outputs import write_json_atomic
from .pruning import ModulePruning, PruneReport, _shrink_layer, _update_config, check_prune_arguments, prune
from .training import PRUNE_REPORT_FILE, PRUNED_ADAPTER_DIR, Stage, find_resume_point

STAGE_NAMES = ("stage1", "stage2")


@dataclasses.dataclass
class TwoStageResult:
    model: nn.Module  # the pruned, retrained model (the PeftModel passed in, changed in place)
    trainer: Trainer  # stage 2's Trainer: evaluate, save_model or push_to_hub with it
    prune_report: PruneReport


def split_schedule(args: TrainingArguments, stage1_ratio: float) -> tuple[TrainingArguments, TrainingArguments]:
    """Stage arguments: `stage1_ratio` of the epochs (or of `max_steps`, when set) before pruning, the rest after.

    Each stage writes its checkpoints and logs to its own sub-folder of `args.output_dir`.
    """
    if not 0 < stage1_ratio < 1:
        raise ValueError(f"stage1_ratio must be in (0, 1), got {stage1_ratio}")
    epochs1 = args.num_train_epochs * stage1_ratio
    stages = [{"num_train_epochs": epochs1}, {"num_train_epochs": args.num_train_epochs - epochs1}]
    if args.max_steps > 0:
        if args.max_steps < 2:
            raise ValueError("max_steps must be at least 2 to leave a step for each stage")
        steps1 = min(args.max_steps - 1, max(1, round(args.max_steps * stage1_ratio)))
        stages[0]["max_steps"], stages[1]["max_steps"] = steps1, args.max_steps - steps1
    return tuple(
        dataclasses.replace(args, output_dir=str(Path(args.output_dir, name)), resume_from_checkpoint=None, **values)
        for name, values in zip(STAGE_NAMES, stages)
    )


def read_prune_report(path: str | Path) -> PruneReport:
    values = json.loads(Path(path).read_text())
    modules = {name: ModulePruning(**module) for name, module in values.pop("modules").items()}
    return PruneReport(**values, modules=modules)


def apply_prune_report(model: nn.Module, report: PruneReport) -> None:
    """Give an r0 model the shapes, alphas and config of an earlier pruning (its values come from a checkpoint)."""
    model = unwrap(model)
    adapter_name = resolve_adapter(model, None)
    layers = lora_layers(model, adapter_name)
    if set(layers) != set(report.modules):
        raise ValueError("the prune report names other modules than the model's LoRA layers")
    for name, layer in layers.items():
        module = report.modules[name]
        if layer.r[adapter_name] != module.old_rank:
            raise ValueError(f"{name} has rank {layer.r[adapter_name]}; the prune report started from {module.old_rank}")
        _shrink_layer(layer, adapter_name, torch.tensor(module.kept), module.new_alpha, "none")
    _update_config(model, adapter_name, report)


def train_two_stage(
    model: nn.Module,
    make_trainer: Callable[[nn.Module, TrainingArguments], Trainer],
    args: TrainingArguments,
    *,
    stage1_ratio: float = 0.2,
    target_rank: int | None = None,
    ratio: float | None = None,
    score: str = "magnitude",
    scope: str = "module",
    min_rank: int = 1,
    alpha: str | float = "keep_scaling",
    rewind: str = "none",
    seed: int | None = None,
    resume_from_checkpoint: str | None = None,
) -> TwoStageResult:
    """Train `model` (a peft LoRA model at rank r0) in two stages with LoRPA pruning between them.

    make_trainer(model, stage_args) -> Trainer: called once per stage with that stage's arguments
        (a copy of `args` with its share of the epochs or steps and its own output sub-folder).
    args: the arguments of the whole run; any TrainingArguments subclass (e.g. TRL's SFTConfig).
    The pruning options are `lorpa.prune`'s; neither `target_rank` nor `ratio` keeps 8 per module
    (the paper's RoBERTa setting). `seed` (default `args.seed`) drives the random score.
    The pruned adapter and `prune_report.json` are saved to `args.output_dir` between the stages.
    resume_from_checkpoint: a `checkpoint-N` folder of either stage, or "latest"; `model` is the r0
        model as at the start (a stage-2 resume re-applies the recorded pruning, then loads the checkpoint).
    """
    if target_rank is None and ratio is None:
        target_rank = 8
    prune_kwargs = dict(target_rank=target_rank, ratio=ratio, score=score, scope=scope, min_rank=min_rank,
                        alpha=alpha, rewind=rewind, seed=args.seed if seed is None else seed)
    check_prune_arguments(model, **prune_kwargs)  # fail before stage 1, not after it
    stage1_args, stage2_args = split_schedule(args, stage1_ratio)
    stages = [Stage(name, 0) for name in STAGE_NAMES]
    try:
        start, checkpoint = find_resume_point(resume_from_checkpoint, args.output_dir, stages)
    except UsageError as error:
        raise ValueError(str(error)) from error

    if start == 0:
        trainer = make_trainer(model, stage1_args)
        trainer.train(resume_from_checkpoint=checkpoint)
        report = prune(model, **prune_kwargs)
        trainer.save_model(str(Path(args.output_dir, PRUNED_ADAPTER_DIR)))
        if trainer.is_world_process_zero():
            write_json_atomic(Path(args.output_dir, PRUNE_REPORT_FILE), report.to_dict())
        del trainer  # its optimizer and DDP wrapper hold the pre-pruning parameters
        checkpoint = None
    else:
        report = read_prune_report(Path(args.output_dir, PRUNE_REPORT_FILE))
        apply_prune_report(model, report)

    trainer = make_trainer(model, stage2_args)
    trainer.train(resume_from_checkpoint=checkpoint)
    return TwoStageResult(model, trainer, report)
