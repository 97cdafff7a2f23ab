"""LoRPA in anyone's training script: train at r0, prune, retrain with a fresh Trainer.

    model = lorpa.get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=256, lora_alpha=256))
    result = lorpa.train_two_stage(
        model,
        lambda model, args: SFTTrainer(model=model, args=args, train_dataset=data),  # or any Trainer
        SFTConfig(output_dir="out", num_train_epochs=3),                            # the whole run
        target_rank=8,
    )
    result.trainer.save_model("out")                                             # a standard peft adapter

Every stage after a prune needs its own Trainer: pruning replaces the LoRA parameters, so the
previous optimizer, LR schedule and DDP / accelerate wrapper all hold tensors that no longer exist.
`make_trainer` builds a Trainer for the model it is given (the pruned one after a prune), which wraps
it afresh. Under DDP every process calls `train_two_stage` as it would call `trainer.train()`; `prune`
makes every process keep rank 0's components. The stages are the run scripts' (`lorpa.stages`):
the same split of epochs or steps, `prune_schedule` for several prunes, and `stage1_ratio=1.0` to
prune after the whole budget with no retraining.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from peft import PeftModel
from torch import nn
from transformers import Trainer, TrainingArguments

from .calibration import calibrate, calibration_tokens_wanted, trainer_batches
from .checkpoints import find_resume_point, write_json_atomic
from .cli import UsageError
from .distributed import release_training_wrapper
from .layers import lora_layers, resolve_adapter, unwrap
from .pruning import ModulePruning, PruneReport, _shrink_layer, _update_config, check_prune_arguments, prune
from .sensitivity import DEFAULT_BETA, SensitivityCallback, restore_sensitivity
from .stages import PAPER_TARGET_RANK, lorpa_stages, parse_prune_schedule, prune_files, stage_prune_kwargs
from .sharded import check_sharded_options, fsdp_requested, prune_through_files, prunes_from_files
from .tolerance import ToleranceSearch, prune_to_tolerance


@dataclasses.dataclass
class TwoStageResult:
    model: nn.Module  # the pruned, retrained model (the PeftModel passed in, changed in place)
    trainer: Trainer  # the last stage's Trainer: evaluate, save_model or push_to_hub with it
    prune_report: PruneReport  # the last prune's
    prune_reports: list[PruneReport] = dataclasses.field(default_factory=list)  # every prune, in order
    tolerance_search: ToleranceSearch | None = None  # with `tolerance`: every candidate budget and the one kept


def apply_prune_report(model: nn.Module, report: PruneReport) -> None:
    """Give a model the shapes, alphas and config of an earlier pruning (its values come from a checkpoint)."""
    model = unwrap(model)
    adapter_name = resolve_adapter(model, None)
    layers = lora_layers(model, adapter_name)
    if set(layers) != set(report.modules):
        raise ValueError("the prune report names other modules than the model's LoRA layers")
    for name, layer in layers.items():
        module = report.modules[name]
        if layer.r[adapter_name] != module.old_rank:
            raise ValueError(f"{name} has rank {layer.r[adapter_name]}; the prune report started from {module.old_rank}")
        _shrink_layer(layer, adapter_name, torch.tensor(module.kept), module.new_alpha, "none", fold=report.folded)
    _update_config(model, adapter_name, report)


def train_two_stage(
    model: nn.Module,
    make_trainer: Callable[[nn.Module, TrainingArguments], Trainer],
    args: TrainingArguments,
    *,
    stage1_ratio: float = 0.2,
    prune_schedule: str | None = None,
    target_rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    score: str = "magnitude",
    scope: str = "module",
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_multiple: int = 1,
    alpha: str | float = "keep_scaling",
    rewind: str = "none",
    seed: int | None = None,
    svd_split: str = "balanced",
    global_norm: str = "absolute",
    sensitivity_beta: float = DEFAULT_BETA,
    calibration_batches: int | None = None,
    calibration_tokens: str = "real",
    stage2_steps: int | None = None,
    tolerance: float | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    make_model: Callable[[], nn.Module] | None = None,
    resume_from_checkpoint: str | None = None,
) -> TwoStageResult:
    """Train `model` (a peft LoRA model at rank r0) in stages with LoRPA pruning between them.

    make_trainer(model, stage_args) -> Trainer: called once per stage with that stage's arguments
        (a copy of `args` with its share of the epochs or steps and its own output sub-folder).
    args: the arguments of the whole run; any TrainingArguments subclass (e.g. TRL's SFTConfig).
    stage1_ratio: share of the budget trained before the prune; 1.0 prunes at the end, and the last
        Trainer is then only built (for evaluating or saving), not trained.
    prune_schedule: several prunes, "FRACTION:RANK,..." (e.g. "0.1:32,0.15:16,0.2:8"), instead of
        stage1_ratio and target_rank / ratio.
    The pruning options are `lorpa.prune`'s; neither `target_rank` nor `ratio` keeps 8 per module
    (the paper's RoBERTa setting). `seed` (default `args.seed`) drives the random score. With
    score="sensitivity" a `SensitivityCallback` is added to every Trainer that a prune follows. Before each
    prune with score="activation" (or any score, when `calibration_batches` is given, to report its output
    error) `lorpa.calibrate` runs on the stage's training set in order: `calibration_batches` batches, by
    default as many as hold 64 tokens per unit of the LoRA rank; `calibration_tokens` as in `calibrate`.
    stage2_steps: optimizer steps of retraining after the last prune (a short recovery), instead of the rest
        of the budget.
    tolerance, evaluate: with stage1_ratio=1.0 and no budget, keep the smallest global budget whose
        `evaluate(model)` score (higher is better, in the units of `tolerance`; score held-out data, not the
        set you report) is within `tolerance` of the unpruned model's (`lorpa.prune_to_tolerance`).
    Each pruned adapter and its report are saved in `args.output_dir` (as the run scripts name them).
    make_model() -> the base model (without adapters), loaded as for stage 1: needed under FSDP (`args.fsdp`
        or an `accelerate launch` FSDP config), where a sharded model cannot be pruned in place: each prune
        then goes through the saved adapter's files (`lorpa.sharded`) and the next stage starts from
        `make_model()` with the pruned adapter, which its Trainer shards afresh; `result.model` is that model.
    resume_from_checkpoint: a `checkpoint-N` folder of any stage, or "latest"; `model` is the r0
        model as at the start (a later-stage resume re-applies the recorded prunes, then loads the checkpoint).
    """
    if not 0 < stage1_ratio <= 1:
        raise ValueError(f"stage1_ratio must be in (0, 1], got {stage1_ratio}")
    if tolerance is not None and (evaluate is None or stage1_ratio != 1 or prune_schedule is not None
                                  or any(v is not None for v in (target_rank, ratio, energy))):
        raise ValueError("tolerance chooses the budget of a cut at the end: pass evaluate, stage1_ratio=1.0 and no "
                         "target_rank / ratio / energy / prune_schedule")
    if prune_schedule is None and target_rank is None and ratio is None and energy is None and tolerance is None:
        target_rank = PAPER_TARGET_RANK
    prune_kwargs = dict(target_rank=target_rank, ratio=ratio, energy=energy, score=score, scope=scope,
                        min_rank=min_rank, max_rank=max_rank, rank_multiple=rank_multiple, alpha=alpha, rewind=rewind,
                        seed=args.seed if seed is None else seed, svd_split=svd_split, global_norm=global_norm)
    if tolerance is not None:
        prune_kwargs.update(scope="global")
    try:
        if prune_schedule is not None:
            if target_rank is not None or ratio is not None:
                raise UsageError("prune_schedule sets the ranks; drop target_rank / ratio")
            r0 = max(layer.r[resolve_adapter(unwrap(model), None)] for layer in lora_layers(model).values())
            schedule = parse_prune_schedule(prune_schedule, r0)
            prune_kwargs.update(target_rank=schedule[0][1])
        else:
            schedule = [(stage1_ratio, None)]
        checked = prune_kwargs if tolerance is None else {**prune_kwargs, "total_rank": 1}
        check_prune_arguments(model, **checked, calibrated=False)  # fail before stage 1, not after it
        if fsdp_requested(args):
            check_sharded_options(score=score, rewind=rewind, tolerance=tolerance,
                                  calibrates=score == "activation" or calibration_batches is not None)
            if make_model is None:
                raise UsageError("under FSDP pass make_model (a function that loads the base model): stage 2 starts "
                                 "from a fresh, unsharded model with the pruned adapter")
        stages = lorpa_stages(schedule, args.num_train_epochs, args.max_steps, stage2_steps=stage2_steps)
        start, checkpoint = find_resume_point(resume_from_checkpoint, args.output_dir, stages)
    except UsageError as error:
        raise ValueError(str(error)) from error

    reports = [PruneReport.read(Path(args.output_dir, prune_files(stages, i)[1])) for i in range(start) if stages[i].prunes]
    for report in reports:
        apply_prune_report(model, report)
    search = None  # the tolerance search, when this call made it (a resumed stage 2 re-applies its recorded prune)
    for index, stage in enumerate(stages[start:], start=start):
        stage_args = dataclasses.replace(
            args, output_dir=str(Path(args.output_dir, stage.name)), num_train_epochs=stage.epochs,
            max_steps=stage.max_steps, resume_from_checkpoint=None,
        )
        trainer = make_trainer(model, stage_args)
        resume = checkpoint if index == start else None
        if score == "sensitivity" and stage.prunes:
            trainer.add_callback(SensitivityCallback(sensitivity_beta))
            if resume is not None:
                restore_sensitivity(model, json.loads(Path(resume, "trainer_state.json").read_text()))
        if stage.trains:
            trainer.train(resume_from_checkpoint=resume)
            release_training_wrapper(trainer)  # so the script may leave its process group safely (lorpa.distributed)
        if stage.prunes and prunes_from_files(trainer):  # sharded: prune the saved adapter, load it on a fresh model
            adapter_dir, report_file = prune_files(stages, index)
            reports.append(prune_through_files(trainer, stage_args.output_dir, Path(args.output_dir, adapter_dir),
                                               stage_prune_kwargs(prune_kwargs, stage)))
            if trainer.is_world_process_zero():
                write_json_atomic(Path(args.output_dir, report_file), reports[-1].to_dict())
            del trainer
            model = PeftModel.from_pretrained(make_model(), Path(args.output_dir, adapter_dir), is_trainable=True)
        elif stage.prunes:
            if score == "activation" or calibration_batches is not None:
                batches = trainer_batches(trainer, calibration_batches, calibration_tokens_wanted(model))
                calibrate(model, batches, tokens=calibration_tokens)
            if tolerance is None:
                reports.append(prune(model, **stage_prune_kwargs(prune_kwargs, stage)))
            else:
                options = {k: v for k, v in prune_kwargs.items() if k not in ("target_rank", "ratio", "energy", "scope")}
                report, search = prune_to_tolerance(model, evaluate, tolerance, **options)
                reports.append(report)
            adapter_dir, report_file = prune_files(stages, index)
            trainer.save_model(str(Path(args.output_dir, adapter_dir)))
            if trainer.is_world_process_zero():
                write_json_atomic(Path(args.output_dir, report_file), reports[-1].to_dict())
            del trainer  # its optimizer and DDP wrapper hold the pre-pruning parameters
    return TwoStageResult(model, trainer, reports[-1], reports, search)
