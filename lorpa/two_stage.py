"""LoRPA in anyone's training script: train at r0, prune, retrain with a fresh Trainer.

    model = lorpa.get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=256, lora_alpha=256))
    result = lorpa.train_two_stage(
        model,
        lambda model, args: SFTTrainer(model=model, args=args, train_dataset=data),  # or any Trainer
        SFTConfig(output_dir="out", num_train_epochs=3),                            # the whole run
        lorpa.PruneOptions(target_rank=8),
    )
    result.trainer.save_model("out")                                             # a standard peft adapter

Every stage after a prune needs its own Trainer: pruning replaces the LoRA parameters, so the previous optimizer,
LR schedule and DDP / accelerate wrapper all hold tensors that no longer exist. `make_trainer` builds a Trainer for
the model it is given (the pruned one after a prune), which wraps it afresh. Under DDP every process calls
`train_two_stage` as it would call `trainer.train()`; the prune makes every process keep process 0's components.
`StageLoop` is the one loop: the run scripts use it too, adding what only they need through `StageCallback`s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from peft import PeftModel
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import fidelity
from .adapter_files import AdapterFolder
from .budgets import parameters
from .calibration import TOKENS, calibrate, calibration_tokens_wanted, trainer_batches, trainer_rows
from .checkpoints import find_resume_point, read_records, redo_from, write_json_atomic
from .distributed import release_training_wrapper
from .errors import InputError
from .layers import lora_layers, resolve_adapter, unwrap
from .options import PruneOptions, resolve
from .plan import PruneReport
from .pruning import apply_prune_report, check_prune, prune, prune_to_tolerance
from .sensitivity import DEFAULT_BETA, SensitivityCallback, restore_sensitivity
from .sharded import check_sharded_options, fsdp_requested, prune_through_files, prunes_from_files
from .stages import PAPER_TARGET_RANK, Stage, lorpa_stages, parse_prune_schedule, prune_files
from .tolerance import ToleranceSearch


@dataclasses.dataclass(frozen=True)
class StageOptions:
    """How a run's budget is split into stages around its prune(s), and what is recorded for them."""

    stage1_ratio: float = 0.2  # share of the budget trained at r0 before the prune; 1.0 prunes at the end
    prune_schedule: str | None = None  # several prunes, "FRACTION:RANK,..." (e.g. "0.1:32,0.15:16,0.2:8")
    stage2_epochs: float | None = None  # epochs of retraining after the (last) prune; default: the rest
    stage2_steps: int | None = None  # optimizer steps of retraining after the (last) prune (a short recovery)
    calibration_batches: int | None = None  # batches `lorpa.calibrate` runs before each prune (activation score)
    calibration_tokens: str = "real"  # which positions the calibration counts (`lorpa.calibrate`)
    sensitivity_beta: float = DEFAULT_BETA  # moving-average factor of the sensitivity score
    fidelity_rows: int = 256  # training rows each prune's fidelity to the uncut adapter is measured on (0: none)

    def __post_init__(self):
        if not 0 < self.stage1_ratio <= 1:
            raise InputError(f"stage1_ratio must be in (0, 1], got {self.stage1_ratio}")
        if self.stage2_epochs is not None and not self.stage2_epochs >= 0:
            raise InputError(f"stage2_epochs must be >= 0, got {self.stage2_epochs}")
        if self.stage2_steps is not None and self.stage2_steps < 0:
            raise InputError(f"stage2_steps must be >= 0, got {self.stage2_steps}")
        if self.stage2_steps is not None and self.stage2_epochs is not None:
            raise InputError("give stage2_epochs or stage2_steps, not both")
        if self.calibration_batches is not None and self.calibration_batches < 1:
            raise InputError(f"calibration_batches must be a positive integer, got {self.calibration_batches}")
        if self.calibration_tokens not in TOKENS:
            raise InputError(f"unknown calibration_tokens {self.calibration_tokens!r}; choose one of "
                             f"{', '.join(TOKENS)}")
        if not 0 <= self.sensitivity_beta < 1:
            raise InputError(f"sensitivity_beta must be in [0, 1), got {self.sensitivity_beta}")
        if not isinstance(self.fidelity_rows, int) or self.fidelity_rows < 0:
            raise InputError(f"fidelity_rows must be an integer >= 0, got {self.fidelity_rows}")

    def schedule(self, r0: int) -> list[tuple[float, int | None]]:
        """(fraction of the budget after which to prune, target rank) per prune; None: the options' budget."""
        if self.prune_schedule is None:
            return [(self.stage1_ratio, None)]
        return parse_prune_schedule(self.prune_schedule, r0)

    def stages(self, num_train_epochs: float, max_steps: int, r0: int) -> list[Stage]:
        return lorpa_stages(self.schedule(r0), num_train_epochs, max_steps, self.stage2_epochs, self.stage2_steps)

    @property
    def retrains(self) -> bool:
        """Whether training follows the last prune (else the cut is left as it is: svd is the default score)."""
        last = 1.0 if self.prune_schedule is None and self.stage1_ratio == 1 else None
        if self.prune_schedule is not None:
            last = float(self.prune_schedule.split(",")[-1].split(":")[0]) if ":" in self.prune_schedule else 0.0
        return not (last == 1.0 and not self.stage2_epochs and not self.stage2_steps)

    def calibrates(self, options: PruneOptions) -> bool:
        """A calibration pass precedes each prune: the activation score needs one, and any score measures its
        output error with one."""
        return options.score == "activation" or self.calibration_batches is not None


@dataclasses.dataclass
class PruneStep:
    """One prune of a run, as the loop made it."""

    report: PruneReport
    calibration_tokens: int | None = None  # tokens `lorpa.calibrate` counted before it
    tolerance_search: ToleranceSearch | None = None


@dataclasses.dataclass
class TwoStageResult:
    model: nn.Module  # the pruned, retrained model (the PeftModel passed in, changed in place; a new one under FSDP)
    trainer: Trainer  # the last stage's Trainer: evaluate, save_model or push_to_hub with it
    prune_report: PruneReport | None  # the last prune's
    prune_reports: list[PruneReport] = dataclasses.field(default_factory=list)  # every prune, in order
    tolerance_search: ToleranceSearch | None = None  # with a tolerance: every candidate budget and the one kept

    @property
    def fidelity(self) -> dict | None:
        """The last prune's fidelity to the uncut adapter (`lorpa.fidelity.Fidelity` as a dict), when measured."""
        return None if self.prune_report is None else self.prune_report.fidelity


class StageCallback:
    """What a caller adds to the loop (the run scripts: AdaLoRA's budget, evaluations, summaries). Every method is
    optional; `resume` is the checkpoint a stage resumes from."""

    def on_stage_begin(self, stage: Stage, trainer: Trainer, resume: str | None) -> None: ...

    def on_stage_end(self, stage: Stage, trainer: Trainer) -> None: ...

    def on_prune(self, stage: Stage, trainer: Trainer, model: nn.Module, step: PruneStep) -> None: ...


def prune_log(report: PruneReport, model: nn.Module) -> dict[str, float]:
    """What a prune did, as numbers for the Trainer's log history (and so for --report_to tensorboard or wandb)."""
    shapes = {name: (layer.in_features, layer.out_features) for name, layer in lora_layers(model).items()
              if name in report.ranks}
    ranks = list(report.ranks.values())
    logged = {"prune/total_rank_before": sum(report.old_ranks.values()), "prune/total_rank_after": sum(ranks),
              "prune/parameters_before": parameters(shapes, report.old_ranks),
              "prune/parameters_after": parameters(shapes, report.ranks),
              "prune/rank_min": min(ranks), "prune/rank_max": max(ranks),
              "prune/mean_relative_error": report.mean_relative_error}
    if report.mean_output_error is not None:
        logged["prune/mean_output_error"] = report.mean_output_error
    return logged


def stage_arguments(args: TrainingArguments, stage: Stage) -> TrainingArguments:
    """The run's arguments for one stage: its share of the budget, in its own sub-folder. A stage never pushes to
    the Hub (its checkpoints are not the result: a stage-1 adapter has rank r0); push the final adapter. Its logged
    loss keeps a NaN or inf step in (`FiniteTraining` stops there)."""
    return dataclasses.replace(args, output_dir=str(Path(args.output_dir, stage.name)), num_train_epochs=stage.epochs,
                               max_steps=stage.max_steps, resume_from_checkpoint=None, push_to_hub=False,
                               logging_nan_inf_filter=False)


class FiniteTraining(TrainerCallback):
    """Stops a stage whose training loss or gradient norm is no longer finite, before the step's checkpoint is
    saved, so the last good checkpoint stays the latest and no results follow that look like success."""

    def __init__(self, stage: Stage):
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                saved = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"
                raise InputError(f"{self.stage.name}, step {state.global_step}: the training {key} is {value}, the "
                                 f"run diverged; {kept}. Lower the learning rate (or the pruned alpha) and resume")


@dataclasses.dataclass
class StageLoop:
    """Train `stages` in order, pruning after each stage that says so, with a fresh Trainer per stage; resume from
    `args.resume_from_checkpoint` (a `checkpoint-N` folder of any stage, or "latest") by re-applying the recorded
    prunes to the r0 model and loading the checkpoint."""

    make_trainer: Callable[[nn.Module, TrainingArguments], Trainer]
    args: TrainingArguments
    options: PruneOptions
    stage_options: StageOptions = StageOptions()
    evaluate: Callable[[nn.Module], float] | None = None  # scores a candidate of a tolerance search
    make_model: Callable[[], nn.Module] | None = None  # the base model, loaded afresh: under FSDP
    callbacks: Sequence[StageCallback] = ()

    def check(self, model: nn.Module) -> None:
        """Everything that can be checked before stage 1, so a bad option fails in seconds, not after training."""
        if self.options.tolerance is not None and (self.stage_options.retrains
                                                   or self.stage_options.prune_schedule is not None):
            raise InputError("a tolerance chooses the budget of a cut at the end: pass stage1_ratio=1.0, no "
                             "retraining and no prune_schedule")
        labelled = self.options.search_metric(self.evaluate is not None) == "score"
        if self.options.tolerance is not None and labelled and self.evaluate is None:
            raise InputError("tolerance_metric score needs evaluate(model) -> score on held-out rows")
        if self.options.tolerance is not None and not labelled and not self.stage_options.fidelity_rows:
            raise InputError("a label-free tolerance (agreement, kl) compares answers on training rows: give "
                             "fidelity_rows > 0, or evaluate for a labelled score")
        check_prune(model, self.options, calibrated=False)
        if fsdp_requested(self.args):
            check_sharded_options(self.options, self.stage_options.calibrates(self.options))
            if self.make_model is None:
                raise InputError("under FSDP pass make_model (a function that loads the base model): the stage "
                                 "after a prune starts from a fresh, unsharded model with the pruned adapter")

    def resumed_reports(self, model: nn.Module, stages: list[Stage], start: int) -> list[PruneReport]:
        """The prunes recorded before stage `start`, re-applied to `model`; a missing or damaged record (report or
        pruned adapter) is one line that says what to resume from."""
        output_dir = self.args.output_dir
        records = read_records(output_dir, stages, start,
                               lambda i: prune_files(stages, i)[1] if stages[i].prunes else None)
        for index in (i for i in range(start) if stages[i].prunes):
            try:
                AdapterFolder(Path(output_dir, prune_files(stages, index)[0]))
            except InputError as error:
                raise InputError(f"{error}; {redo_from(output_dir, stages, start)}") from None
        reports = []
        for record in records:
            try:
                reports.append(PruneReport.from_dict(record))
            except (KeyError, TypeError, AttributeError) as error:
                raise InputError(f"{output_dir}: the record of the pruning step is missing or damaged ({error!r}); "
                                 f"{redo_from(output_dir, stages, start)}") from None
            apply_prune_report(model, reports[-1])
        return reports

    def prune_after(self, stage: Stage, index: int, stages: list[Stage], trainer: Trainer, model: nn.Module):
        """The prune after stage `index`, saved as the run layout says: (model to train next, PruneStep)."""
        options = self.options if stage.prune_to is None else self.options.at_rank(stage.prune_to)
        adapter_dir, report_file = (Path(self.args.output_dir, name) for name in prune_files(stages, index))
        step = None
        if prunes_from_files(trainer):  # sharded: prune the saved adapter, load it on a fresh model
            step = PruneStep(prune_through_files(trainer, trainer.args.output_dir, adapter_dir, options))
            model = PeftModel.from_pretrained(self.make_model(), adapter_dir, is_trainable=True)
        else:
            tokens = None
            # labels, where the batches have them, only mark the positions that count and give the perplexity ratio
            rows = list(trainer_rows(trainer, self.stage_options.fidelity_rows))
            uncut = fidelity.reference(model, rows) if rows else None
            if self.stage_options.calibrates(options):
                wanted = calibration_tokens_wanted(model)
                batches = trainer_batches(trainer, self.stage_options.calibration_batches, wanted)
                tokens = calibrate(model, batches, tokens=self.stage_options.calibration_tokens)
            if options.tolerance is None:
                step = PruneStep(prune(model, options), tokens)
            else:
                labelled = options.search_metric(self.evaluate is not None) == "score"
                report, search = prune_to_tolerance(model, self.evaluate if labelled else None, options=options,
                                                    batches=rows)
                step = PruneStep(report, tokens, search)
            if uncut is not None:
                step.report.fidelity = fidelity.compare(model, rows, uncut).to_dict()
            trainer.save_model(str(adapter_dir))
        if trainer.is_world_process_zero():
            write_json_atomic(report_file, step.report.to_dict())
        trainer.log(prune_log(step.report, model))
        return model, step

    def run(self, model: nn.Module, stages: list[Stage]) -> TwoStageResult:
        if any(stage.prunes for stage in stages):
            self.check(model)
        start, checkpoint = find_resume_point(self.args.resume_from_checkpoint, self.args.output_dir, stages)
        reports = self.resumed_reports(model, stages, start)
        search = None
        sensitivity = self.options.score == "sensitivity"
        for index, stage in enumerate(stages[start:], start=start):
            trainer = self.make_trainer(model, stage_arguments(self.args, stage))
            resume = checkpoint if index == start else None
            if sensitivity and stage.prunes:
                trainer.add_callback(SensitivityCallback(self.stage_options.sensitivity_beta))
                if resume is not None:
                    restore_sensitivity(model, json.loads(Path(resume, "trainer_state.json").read_text()))
            trainer.add_callback(FiniteTraining(stage))
            for callback in self.callbacks:
                callback.on_stage_begin(stage, trainer, resume)
            if stage.trains:
                trainer.train(resume_from_checkpoint=resume)
                release_training_wrapper(trainer)  # so the script may leave its process group safely
            for callback in self.callbacks:
                callback.on_stage_end(stage, trainer)
            if stage.prunes:
                model, step = self.prune_after(stage, index, stages, trainer, model)
                reports.append(step.report)
                search = step.tolerance_search or search
                for callback in self.callbacks:
                    callback.on_prune(stage, trainer, model, step)
        return TwoStageResult(model, trainer, reports[-1] if reports else None, reports, search)


def train_two_stage(model: nn.Module, make_trainer: Callable[[nn.Module, TrainingArguments], Trainer],
                    args: TrainingArguments, options: PruneOptions | None = None, *,
                    stages: StageOptions | None = None, evaluate: Callable[[nn.Module], float] | None = None,
                    make_model: Callable[[], nn.Module] | None = None, **keywords) -> TwoStageResult:
    """Train `model` (a peft LoRA model at rank r0) in stages with LoRPA pruning between them.

    make_trainer(model, stage_args) -> Trainer: called once per stage with that stage's arguments (a copy of
        `args` with its share of the epochs or steps and its own output sub-folder).
    args: the arguments of the whole run; any TrainingArguments subclass (e.g. TRL's SFTConfig). Its
        `resume_from_checkpoint` (a `checkpoint-N` folder of any stage, or "latest") resumes the run; `model` is
        then the r0 model as at the start.
    options: the prune (`PruneOptions`; the paper's target_rank 8 when it gives no budget; its seed defaults to
        `args.seed`); stages: how the budget is split (`StageOptions`: stage1_ratio, prune_schedule, ...).
        Their fields may also be given as keywords, as may resume_from_checkpoint.
    evaluate(model) -> float: with a tolerance budget (stage1_ratio=1.0), scores each candidate (higher is better,
        in the units of the tolerance; score held-out data, not the set you report).
    make_model() -> the base model (without adapters), loaded as for stage 1: needed under FSDP (`args.fsdp` or an
        `accelerate launch` FSDP config), where each prune goes through the saved adapter's files (`lorpa.sharded`)
        and the next stage starts from `make_model()` with the pruned adapter; `result.model` is that model.
    Each pruned adapter and its report are saved in `args.output_dir` (as the run scripts name them).
    """
    stage_fields = {f.name for f in dataclasses.fields(StageOptions)}
    prune_fields = {f.name for f in dataclasses.fields(PruneOptions)}
    unknown = set(keywords) - stage_fields - prune_fields - {"resume_from_checkpoint"}
    if unknown:
        raise TypeError(f"train_two_stage() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    if "resume_from_checkpoint" in keywords:
        args = dataclasses.replace(args, resume_from_checkpoint=keywords.pop("resume_from_checkpoint"))
    stage_keywords = {k: keywords.pop(k) for k in list(keywords) if k in stage_fields}
    stages = dataclasses.replace(stages or StageOptions(), **stage_keywords)
    prune_keywords = {"seed": args.seed, **keywords} if options is None or options.seed is None else keywords
    options = resolve(options, prune_keywords, stages.retrains)
    if stages.prune_schedule is not None:
        if options.budgets():
            raise InputError(f"prune_schedule sets the ranks; drop {' / '.join(options.budgets())}")
    elif options.tolerance is None:
        options = options.with_default_budget(PAPER_TARGET_RANK)
    adapter_name = resolve_adapter(unwrap(model), None)
    r0 = max(layer.r[adapter_name] for layer in lora_layers(model, adapter_name).values())
    loop = StageLoop(make_trainer, args, options, stages, evaluate, make_model)
    return loop.run(model, stages.stages(args.num_train_epochs, args.max_steps, r0))
