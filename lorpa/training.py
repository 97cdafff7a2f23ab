"""The two-stage LoRPA schedule over any transformers Trainer, and the single-stage baselines.

lorpa:  stage1 (r0, `stage1_ratio` of the epochs) -> prune -> stage2 (fresh Trainer, so a fresh
        optimizer and LR schedule, for the remaining epochs).
others: one stage, "train", for all epochs.

Every stage trains in its own sub-folder of the output folder, so `--resume_from_checkpoint`
can name a checkpoint of either stage; the pruned adapter is saved between the stages so that a
stage-2 checkpoint (pruned shapes) can be resumed in a new process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Callable

import torch
from peft import PeftModel
from transformers import Trainer, TrainingArguments

from .adapters import AdaLoraAllocationCallback, attach_adapters
from .arguments import MethodArguments
from .cli import UsageError
from .layers import lora_layers
from .outputs import write_json_atomic
from .pruning import PruneReport, check_prune_arguments, prune

PRUNED_ADAPTER_DIR = "pruned_adapter"
PRUNE_REPORT_FILE = "prune_report.json"
STAGE_SUMMARY_FILE = "stage_summary.json"


@dataclasses.dataclass
class Stage:
    name: str
    epochs: float


@dataclasses.dataclass
class TrainingOutcome:
    """What the run scripts put into results.json."""

    model: torch.nn.Module
    trainer: Trainer
    stages: list[dict]
    stage1_ranks: dict[str, int] | None
    prune_report: PruneReport | dict | None


def plan_stages(args: MethodArguments, num_train_epochs: float) -> list[Stage]:
    if args.method != "lorpa":
        return [Stage("train", num_train_epochs)]
    stage1 = num_train_epochs * args.stage1_ratio
    return [Stage("stage1", stage1), Stage("stage2", num_train_epochs - stage1)]


def optimizer_steps(num_examples: int, training_args: TrainingArguments, epochs: float) -> int:
    """Optimizer steps a Trainer will take (AdaLoRA needs its budget schedule up front)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    batches = math.ceil(num_examples / (training_args.per_device_train_batch_size * training_args.world_size))
    return max(1, math.ceil(epochs * math.ceil(batches / training_args.gradient_accumulation_steps)))


def find_resume_point(checkpoint: str | None, output_dir: str, stages: list[Stage]) -> tuple[int, str | None]:
    """(index of the stage to start in, checkpoint to resume it from).

    `checkpoint` is a path to a `checkpoint-N` folder inside a stage folder, or "latest".
    """
    if checkpoint is None:
        return 0, None
    names = [stage.name for stage in stages]
    if checkpoint == "latest":
        for index in reversed(range(len(stages))):
            found = sorted(
                Path(output_dir, names[index]).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
            )
            if found:
                return index, str(found[-1])
        raise UsageError(f"no checkpoint to resume under {output_dir}")
    path = Path(checkpoint)
    if not path.is_dir():
        raise UsageError(f"checkpoint not found: {checkpoint}")
    if path.parent.name not in names:
        raise UsageError(f"checkpoint {checkpoint} is not inside a stage folder ({', '.join(names)})")
    return names.index(path.parent.name), str(path)


def evaluation_history(trainer: Trainer) -> list[dict]:
    """One dict per evaluation: the Trainer's eval_* logs with the prefix removed, plus epoch and step."""
    history = {}
    for entry in trainer.state.log_history:
        metrics = {k[5:]: v for k, v in entry.items() if k.startswith("eval_") and not re.search(r"(runtime|per_second)$", k)}
        if metrics:
            history.setdefault(entry["step"], {"epoch": entry.get("epoch"), "step": entry["step"]}).update(metrics)
    return list(history.values())


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# The task heads of transformers models (peft trains them for task types SEQ_CLS, TOKEN_CLS, QA).
HEAD_MODULES = frozenset({"classifier", "score", "classification_head", "qa_outputs"})


def count_head(model: torch.nn.Module) -> int:
    """Trainable parameters of the task head: papers count adapters without it (LoRA r=8: 0.3M)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if p.requires_grad and HEAD_MODULES.intersection(name.split(".")))


def adapter_ranks(model: torch.nn.Module) -> dict[str, int]:
    """Rank per adapted module; AdaLoRA reports the ranks its budget left non-zero."""
    if not isinstance(model, PeftModel):
        return {}
    config = model.peft_config[model.active_adapter]
    if config.peft_type.value == "ADALORA":
        return {
            name: int((module.lora_E[model.active_adapter] != 0).sum())
            for name, module in model.get_base_model().named_modules()
            if hasattr(module, "lora_E") and model.active_adapter in module.lora_E
        }
    return {name: layer.r[model.active_adapter] for name, layer in lora_layers(model).items()}


def pruning_summary(report: PruneReport, process_index: int) -> str:
    """One line per process; equal digests show every replica kept the same components."""
    kept = json.dumps({name: module.kept for name, module in report.modules.items()}, sort_keys=True)
    before, after = sum(report.old_ranks.values()), sum(report.ranks.values())
    digest = hashlib.sha256(kept.encode()).hexdigest()[:16]
    return f"[process {process_index}] pruned {before} -> {after} rank components; kept-set digest {digest}"


def train_stages(
    *,
    load_model: Callable[[], torch.nn.Module],
    make_trainer: Callable[[torch.nn.Module, TrainingArguments], Trainer],
    method_args: MethodArguments,
    training_args: TrainingArguments,
    task_type: str,
    num_train_examples: int,
) -> TrainingOutcome:
    """Train every stage of the method, pruning between lorpa's two, and save the final model."""
    output_dir = training_args.output_dir
    stages = plan_stages(method_args, training_args.num_train_epochs)
    start, checkpoint = find_resume_point(training_args.resume_from_checkpoint, output_dir, stages)
    prune_kwargs = method_args.prune_kwargs(training_args.seed)

    if start == 1:
        model = PeftModel.from_pretrained(load_model(), Path(output_dir, PRUNED_ADAPTER_DIR), is_trainable=True)
        prune_report = json.loads(Path(output_dir, PRUNE_REPORT_FILE).read_text())
        stage1_ranks = {name: module["old_rank"] for name, module in prune_report["modules"].items()}
    else:
        total_steps = optimizer_steps(num_train_examples, training_args, training_args.num_train_epochs)
        model = attach_adapters(load_model(), method_args, task_type, total_steps)
        prune_report, stage1_ranks = None, None
        if method_args.method == "lorpa":
            try:
                check_prune_arguments(model, **prune_kwargs)
            except ValueError as error:
                raise UsageError(str(error)) from error

    summaries = [json.loads(Path(output_dir, s.name, STAGE_SUMMARY_FILE).read_text()) for s in stages[:start]]
    for index, stage in enumerate(stages[start:], start=start):
        stage_args = dataclasses.replace(
            training_args,
            output_dir=str(Path(output_dir, stage.name)),
            num_train_epochs=stage.epochs,
            resume_from_checkpoint=None,
        )
        trainer = make_trainer(model, stage_args)
        if method_args.method == "adalora":
            trainer.add_callback(AdaLoraAllocationCallback())
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=checkpoint if index == start else None)
        if all(entry["step"] != trainer.state.global_step for entry in evaluation_history(trainer)):
            trainer.evaluate()  # a stage that ends mid-epoch would otherwise end unevaluated
        summary = {
            "name": stage.name,
            "epochs": stage.epochs,
            "train_runtime_s": time.perf_counter() - started,
            "trainable_params": count_trainable(model),
            "head_params": count_head(model),
            "ranks": adapter_ranks(model),
            "history": evaluation_history(trainer),
        }
        summaries.append(summary)
        if trainer.is_world_process_zero():
            write_json_atomic(Path(stage_args.output_dir, STAGE_SUMMARY_FILE), summary)

        if stage.name == "stage1":
            stage1_ranks = adapter_ranks(model)
            prune_report = prune(model, **prune_kwargs)
            print(pruning_summary(prune_report, trainer.args.process_index), flush=True)
            trainer.save_model(str(Path(output_dir, PRUNED_ADAPTER_DIR)))
            if trainer.is_world_process_zero():
                write_json_atomic(Path(output_dir, PRUNE_REPORT_FILE), prune_report.to_dict())

    trainer.save_model(output_dir)
    return TrainingOutcome(model, trainer, summaries, stage1_ranks, prune_report)
