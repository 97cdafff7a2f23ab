"""The run scripts' training loop: LoRPA's stages (`lorpa.stages`) over any transformers Trainer, and the baselines.

lorpa:  stage1 (r0, `stage1_ratio` of the epochs) -> prune -> stage2 (fresh Trainer, so a fresh
        optimizer and LR schedule, for the remaining epochs, or `stage2_epochs`; none at
        stage1_ratio 1.0, where the pruned adapter is only evaluated). `prune_schedule` puts
        several prunes in a row: stage1 -> prune -> stage2 -> prune -> ... -> final stage.
others: one stage, "train", for all epochs.

Every stage trains in its own sub-folder of the output folder, so `--resume_from_checkpoint`
can name a checkpoint of any stage; each pruned adapter is saved before the next stage starts so
that a checkpoint with pruned shapes can be resumed in a new process. Each prune is followed by an
evaluation of the pruned, not yet retrained model, so results show what the prune itself cost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from peft import PeftModel
from transformers import Trainer, TrainingArguments

from ..calibration import calibrate, calibration_tokens_wanted, trainer_batches
from ..checkpoints import checkpoint_problem, find_resume_point, write_json_atomic
from ..cli import UsageError
from ..distributed import release_training_wrapper
from ..layers import lora_layers
from ..pruning import PruneReport, check_prune_arguments, prune
from ..rewind import init_state_dict, load_init_state_dict
from ..sharded import check_sharded_options, fsdp_requested, prune_through_files, prunes_from_files
from ..sensitivity import SensitivityCallback, restore_sensitivity
from ..stages import Stage, lorpa_stages, prune_files, stage_prune_kwargs
from ..tolerance import prune_to_tolerance
from .adapters import AdaLoraAllocationCallback, attach_adapters
from .arguments import MethodArguments
from .curves import TOLERANCE_PLOT_FILE, plot_tolerance

STAGE_SUMMARY_FILE = "stage_summary.json"


@dataclasses.dataclass
class TrainingOutcome:
    """What the run scripts put into results.json."""

    model: torch.nn.Module
    trainer: Trainer
    stages: list[dict]
    stage1_ranks: dict[str, int] | None
    prune_report: PruneReport | dict | None  # the last prune's
    prunes: list[dict] = dataclasses.field(default_factory=list)  # every prune: when, ranks, scores before/after


def plan_stages(args: MethodArguments, num_train_epochs: float, max_steps: int = -1) -> list[Stage]:
    if args.method != "lorpa":
        return [Stage("train", num_train_epochs, max_steps)]
    return lorpa_stages(args.schedule(), num_train_epochs, max_steps, args.stage2_epochs, args.stage2_steps)


def optimizer_steps(num_examples: int, training_args: TrainingArguments, epochs: float) -> int:
    """Optimizer steps a Trainer will take (AdaLoRA needs its budget schedule up front)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    batches = math.ceil(num_examples / (training_args.per_device_train_batch_size * training_args.world_size))
    return max(1, math.ceil(epochs * math.ceil(batches / training_args.gradient_accumulation_steps)))


def _metrics(entry: dict) -> dict:
    """eval_* values with the prefix removed, without the timing keys."""
    return {k[5:]: v for k, v in entry.items() if k.startswith("eval_") and not re.search(r"(runtime|per_second|preparation_time)$", k)}


def _remedy(output_dir: str, stages: list[Stage], start: int) -> str:
    """How to get past a damaged record of the prune before stage `start`: redo it from the stage before."""
    previous = stages[start - 1].name
    found = sorted(Path(output_dir, previous).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    usable = [p for p in found if checkpoint_problem(p) is None]
    if not usable:
        return f"no {previous} checkpoint is left to redo it from: start again with --overwrite_output_dir"
    return f"resume from {previous} with --resume_from_checkpoint {usable[-1]} (the pruning is redone deterministically)"


def read_prune_records(output_dir: str, stages: list[Stage], start: int):
    """(prune reports, stage summaries, stage-1 ranks) written before stage `start`, for resuming it; a
    missing or damaged one is reported with the way out."""
    try:
        reports = [json.loads(Path(output_dir, prune_files(stages, i)[1]).read_text())
                   for i in range(start) if stages[i].prunes]
        summaries = [json.loads(Path(output_dir, s.name, STAGE_SUMMARY_FILE).read_text()) for s in stages[:start]]
        stage1_ranks = {name: module["old_rank"] for name, module in reports[0]["modules"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"{output_dir}: the record of the pruning step is missing or damaged ({_describe(error)}); "
                         f"{_remedy(output_dir, stages, start)}") from error
    return reports, summaries, stage1_ranks


def load_pruned_adapter(load_model: Callable[[], torch.nn.Module], output_dir: str, stages: list[Stage], start: int):
    """The model with the adapter pruned before stage `start`, for resuming it."""
    adapter = Path(output_dir, prune_files(stages, start - 1)[0])
    model = load_model()
    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    except Exception as error:  # missing folder, damaged safetensors, shape mismatch: many exception types
        raise UsageError(f"{adapter} cannot be loaded ({_describe(error)}); {_remedy(output_dir, stages, start)}") from error


def _describe(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def evaluation_history(trainer: Trainer) -> list[dict]:
    """One dict per evaluation: the Trainer's eval_* logs with the prefix removed, plus epoch and step."""
    history = {}
    for entry in trainer.state.log_history:
        metrics = _metrics(entry)
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


def _resumed_init_snapshot(fresh_model: torch.nn.Module, reports: list[dict]) -> dict[str, torch.Tensor]:
    """Injection-time values of the components that survived `reports`, for a resumed `rewind="init"`.

    A freshly built model with the same seed has the same injection-time values; each report's
    `kept` indices then pick the survivors, prune after prune.
    """
    state = init_state_dict(fresh_model)
    for report in reports:
        for name, module in report["modules"].items():
            kept = torch.tensor(module["kept"])
            state[f"{name}.lora_A"] = state[f"{name}.lora_A"][kept]
            state[f"{name}.lora_B"] = state[f"{name}.lora_B"][:, kept]
    return state


def search_kwargs(prune_kwargs: dict, method_args: MethodArguments) -> dict:
    """`lorpa.prune`'s options for the checks of a tolerance search: a global budget, which the search sets."""
    if method_args.prune_tolerance is None:
        return prune_kwargs
    return {**prune_kwargs, "target_rank": None, "ratio": None, "energy": None, "total_rank": 1, "scope": "global"}


def prune_in_memory(model, trainer: Trainer, method_args: MethodArguments, prune_kwargs: dict, selection_score):
    """Calibrate when the prune asks for it, then prune `model` in place, or search the smallest budget within
    --prune_tolerance: (prune report, tokens calibrated or None, tolerance search or None)."""
    tokens = search = None
    if method_args.calibrates:
        batches = trainer_batches(trainer, method_args.calibration_batches, calibration_tokens_wanted(model))
        tokens = calibrate(model, batches, tokens=method_args.calibration_tokens)
    if method_args.prune_tolerance is None:
        return prune(model, **prune_kwargs), tokens, search
    options = {k: v for k, v in search_kwargs(prune_kwargs, method_args).items() if k not in ("total_rank", "scope")}
    report, search = prune_to_tolerance(model, lambda _: selection_score(trainer), method_args.prune_tolerance, **options)
    sys.stdout.write(tolerance_summary(search) + "\n")
    return report, tokens, search


def tolerance_summary(search) -> str:
    kept = next((c for c in search.candidates if c.total_rank == search.kept), None)
    where = "unpruned" if kept is None else f"{kept.parameters} parameters, {kept.score:.2f} points"
    return (f"tolerance search: {len(search.candidates)} candidates; kept total rank {search.kept} of {search.full_rank} "
            f"({where}) against {search.reference:.2f} unpruned" + ("" if search.within else "; none was within the tolerance"))


def _trainer_state(checkpoint: str) -> dict:
    return json.loads(Path(checkpoint, "trainer_state.json").read_text())


def train_stages(
    *,
    load_model: Callable[[], torch.nn.Module],
    make_trainer: Callable[[torch.nn.Module, TrainingArguments], Trainer],
    method_args: MethodArguments,
    training_args: TrainingArguments,
    task_type: str,
    num_train_examples: int,
    selection_score: Callable[[Trainer], float] | None = None,
) -> TrainingOutcome:
    """Train every stage of the method, pruning after each stage that `plan_stages` says, and save the final model.

    selection_score(trainer) -> points on the held-out selection split, for `--prune_tolerance`.
    """
    output_dir = training_args.output_dir
    stages = plan_stages(method_args, training_args.num_train_epochs, training_args.max_steps)
    start, checkpoint = find_resume_point(training_args.resume_from_checkpoint, output_dir, stages)
    prune_kwargs = method_args.prune_kwargs(training_args.seed)
    track_sensitivity = method_args.method == "lorpa" and method_args.prune_score == "sensitivity"
    total_steps = optimizer_steps(num_train_examples, training_args, training_args.num_train_epochs)

    reports, summaries, stage1_ranks = read_prune_records(output_dir, stages, start) if start > 0 else ([], [], None)
    if start > 0:
        snapshot = None
        if method_args.rewind == "init" and any(stage.prunes for stage in stages[start:]):
            snapshot = _resumed_init_snapshot(attach_adapters(load_model(), method_args, task_type, total_steps), reports)
        model = load_pruned_adapter(load_model, output_dir, stages, start)
        if snapshot is not None:
            load_init_state_dict(model, snapshot)
        prune_report = reports[-1]
    else:
        if method_args.stage1_adapter is not None:
            model = PeftModel.from_pretrained(load_model(), method_args.stage1_adapter, is_trainable=True)
        else:
            model = attach_adapters(load_model(), method_args, task_type, total_steps)
        prune_report = None
        if method_args.method == "lorpa":
            try:
                if fsdp_requested(training_args):
                    check_sharded_options(score=method_args.prune_score, rewind=method_args.rewind,
                                          calibrates=method_args.calibrates, tolerance=method_args.prune_tolerance)
                check_prune_arguments(model, **search_kwargs(prune_kwargs, method_args), calibrated=False)
            except ValueError as error:
                raise UsageError(str(error)) from error

    for index, stage in enumerate(stages[start:], start=start):
        stage_args = dataclasses.replace(
            training_args,
            output_dir=str(Path(output_dir, stage.name)),
            num_train_epochs=stage.epochs,
            max_steps=stage.max_steps,
            resume_from_checkpoint=None,
        )
        trainer = make_trainer(model, stage_args)
        if method_args.method == "adalora":
            trainer.add_callback(AdaLoraAllocationCallback())
        resume = checkpoint if index == start else None
        if track_sensitivity and stage.prunes:
            trainer.add_callback(SensitivityCallback(method_args.sensitivity_beta))
            if resume is not None:
                restore_sensitivity(model, _trainer_state(resume))
        started = time.perf_counter()
        if stage.trains and not (index == 0 and method_args.stage1_adapter):
            trainer.train(resume_from_checkpoint=resume)
            release_training_wrapper(trainer)  # no DDP wrapper may outlive the process group (lorpa.distributed)
            if all(entry["step"] != trainer.state.global_step for entry in evaluation_history(trainer)):
                trainer.evaluate()  # a stage that ends mid-epoch would otherwise end unevaluated
            history = evaluation_history(trainer)
        else:  # nothing to train: the stage is the given or the pruned adapter as it is
            metrics = summaries[-1]["prune"]["after"] if summaries else _metrics(trainer.evaluate())
            history = [{"epoch": 0.0, "step": 0, **metrics}]
        summary = {
            "name": stage.name,
            "epochs": stage.epochs,
            "train_runtime_s": time.perf_counter() - started,
            "trainable_params": count_trainable(model),
            "head_params": count_head(model),
            "ranks": adapter_ranks(model),
            "history": history,
        }

        if stage.prunes:
            stage1_ranks = stage1_ranks or adapter_ranks(model)
            adapter_dir, report_file = prune_files(stages, index)
            tokens = search = None
            if prunes_from_files(trainer):  # sharded: prune the saved adapter, then load it on a fresh model
                prune_report = prune_through_files(trainer, stage_args.output_dir, Path(output_dir, adapter_dir),
                                                   stage_prune_kwargs(prune_kwargs, stage))
                del trainer
                model = load_pruned_adapter(load_model, output_dir, stages, index + 1)
                trainer = make_trainer(model, stage_args)
            else:
                prune_report, tokens, search = prune_in_memory(model, trainer, method_args,
                                                               stage_prune_kwargs(prune_kwargs, stage), selection_score)
                trainer.save_model(str(Path(output_dir, adapter_dir)))
            # One write per line: replicas share stdout, and print's separate newline write interleaves.
            sys.stdout.write(pruning_summary(prune_report, trainer.args.process_index) + "\n")
            sys.stdout.flush()
            next_args = dataclasses.replace(stage_args, output_dir=str(Path(output_dir, stages[index + 1].name)))
            after = _metrics(make_trainer(model, next_args).evaluate())
            summary["prune"] = {
                "ranks": prune_report.ranks,
                "mean_relative_error": prune_report.mean_relative_error,
                "mean_output_error": prune_report.mean_output_error,
                "calibration_tokens": tokens,
                **({} if search is None else {"tolerance": search.to_dict()}),
                "before": {k: v for k, v in history[-1].items() if k not in ("epoch", "step")},
                "after": after,
            }
            if trainer.is_world_process_zero():
                write_json_atomic(Path(output_dir, report_file), prune_report.to_dict())
                if search is not None:
                    plot_tolerance(search.to_dict(), Path(output_dir, TOLERANCE_PLOT_FILE))
        summaries.append(summary)
        if trainer.is_world_process_zero():
            write_json_atomic(Path(stage_args.output_dir, STAGE_SUMMARY_FILE), summary)

    trainer.save_model(output_dir)
    prunes = [{"after_stage": s["name"], **s["prune"]} for s in summaries if "prune" in s]
    return TrainingOutcome(model, trainer, summaries, stage1_ranks, prune_report, prunes)
