"""The run scripts' training: LoRPA's stages, or one stage of a baseline, through the library's one loop
(`lorpa.two_stage.StageLoop`), with what only the run scripts record added as a `StageCallback`.

lorpa:  stage1 (r0, `stage1_ratio` of the epochs) -> prune -> stage2 (fresh Trainer, so a fresh optimizer and LR
        schedule, for the remaining epochs, or `stage2_epochs`; none at stage1_ratio 1.0, where the pruned adapter
        is only evaluated). `prune_schedule` puts several prunes in a row.
others: one stage, "train", for all epochs.

Every stage trains in its own sub-folder of the output folder, so `--resume_from_checkpoint` can name a checkpoint
of any stage. Each prune is followed by an evaluation of the pruned, not yet retrained model, so results show what
the prune itself cost; each stage's summary (`stage_summary.json`) goes into results.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel
from transformers import Trainer, TrainingArguments

from ..checkpoints import read_records, write_json_atomic
from ..fidelity import Fidelity
from ..layers import lora_layers
from ..plan import PruneReport
from ..stages import Stage
from ..two_stage import PruneStep, StageCallback, StageLoop, stage_arguments
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
    prune_report: PruneReport | None  # the last prune's
    prunes: list[dict] = dataclasses.field(default_factory=list)  # every prune: when, ranks, scores before/after


def plan_stages(args: MethodArguments, num_train_epochs: float, max_steps: int = -1) -> list[Stage]:
    if args.method != "lorpa":
        return [Stage("train", num_train_epochs, max_steps)]
    stages = args.stage_options().stages(num_train_epochs, max_steps, args.lora_r)
    if args.stage1_adapter is not None:  # stage 1 was trained elsewhere: it is evaluated and pruned
        stages[0] = dataclasses.replace(stages[0], given=True)
    return stages


def optimizer_steps(num_examples: int, training_args: TrainingArguments, epochs: float) -> int:
    """Optimizer steps a Trainer will take (AdaLoRA needs its budget schedule up front)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    batches = math.ceil(num_examples / (training_args.per_device_train_batch_size * training_args.world_size))
    return max(1, math.ceil(epochs * math.ceil(batches / training_args.gradient_accumulation_steps)))


def _metrics(entry: dict) -> dict:
    """eval_* values with the prefix removed, without the timing keys."""
    timing = re.compile(r"(runtime|per_second|preparation_time)$")
    return {k[5:]: v for k, v in entry.items() if k.startswith("eval_") and not timing.search(k)}


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


def tolerance_summary(search) -> str:
    show = {"score": "{:.2f} points", "agreement": "{:.2f}% of top-1 answers unchanged",
            "kl": "mean KL {:.3g} from the uncut adapter"}[search.metric].format
    kept = search.kept_candidate()
    where = "unpruned" if kept is None else f"{kept.parameters} parameters, {show(kept.score)}"
    against = f" against {search.reference:.2f} unpruned" if search.metric == "score" else ""
    capped = "" if search.within else "; none was within the tolerance"
    return (f"tolerance search: {len(search.candidates)} candidates; kept total rank {search.kept} of "
            f"{search.full_rank} ({where}){against}{capped}")


class RunRecorder(StageCallback):
    """The run scripts' records: each stage's summary (evaluations, ranks, runtime), the evaluation of every pruned
    adapter before retraining, AdaLoRA's budget callback, and the tolerance search's plot."""

    def __init__(self, method_args: MethodArguments, make_trainer, output_dir: str, stages: list[Stage]):
        self.method_args, self.make_trainer = method_args, make_trainer
        self.output_dir, self.stages = output_dir, stages
        self.summaries, self.trainer, self.started = None, None, 0.0

    def on_stage_begin(self, stage, trainer, resume):
        if self.summaries is None:  # the first stage this run trains: a resumed run reads the earlier summaries
            start = self.stages.index(stage)
            self.summaries = read_records(self.output_dir, self.stages, start,
                                          lambda i: f"{self.stages[i].name}/{STAGE_SUMMARY_FILE}")
        self.trainer, self.started = trainer, time.perf_counter()
        if self.method_args.method == "adalora":
            trainer.add_callback(AdaLoraAllocationCallback())

    def on_stage_end(self, stage, trainer):
        if stage.trains:
            if all(entry["step"] != trainer.state.global_step for entry in evaluation_history(trainer)):
                trainer.evaluate()  # a stage that ends mid-epoch would otherwise end unevaluated
            history = evaluation_history(trainer)
        else:  # nothing to train: the stage is the given or the pruned adapter as it is
            metrics = self.summaries[-1]["prune"]["after"] if self.summaries else _metrics(trainer.evaluate())
            history = [{"epoch": 0.0, "step": 0, **metrics}]
        self.summaries.append({
            "name": stage.name,
            "epochs": stage.epochs,
            "train_runtime_s": time.perf_counter() - self.started,
            "trainable_params": count_trainable(trainer.model),
            "head_params": count_head(trainer.model),
            "ranks": adapter_ranks(trainer.model),
            "history": history,
        })
        if not stage.prunes:
            self.write_summary(trainer, stage)

    def on_prune(self, stage, trainer, model, step: PruneStep):
        report, search = step.report, step.tolerance_search
        if search is not None:
            sys.stdout.write(tolerance_summary(search) + "\n")
        # One write per line: replicas share stdout, and print's separate newline write interleaves.
        sys.stdout.write(pruning_summary(report, trainer.args.process_index) + "\n")
        if report.fidelity is not None and trainer.is_world_process_zero():
            sys.stdout.write(f"fidelity to the uncut adapter: {Fidelity(**report.fidelity).describe()}\n")
        sys.stdout.flush()
        following = self.stages[self.stages.index(stage) + 1]
        after = _metrics(self.make_trainer(model, stage_arguments(trainer.args, following)).evaluate())
        summary = self.summaries[-1]
        summary["prune"] = {
            "ranks": report.ranks,
            "mean_relative_error": report.mean_relative_error,
            "mean_output_error": report.mean_output_error,
            "calibration_tokens": step.calibration_tokens,
            "fidelity": report.fidelity,
            **({} if search is None else {"tolerance": search.to_dict()}),
            "before": {k: v for k, v in summary["history"][-1].items() if k not in ("epoch", "step")},
            "after": after,
        }
        if trainer.is_world_process_zero() and search is not None:
            plot_tolerance(search.to_dict(), Path(self.output_dir, TOLERANCE_PLOT_FILE))
        self.write_summary(trainer, stage)

    def write_summary(self, trainer, stage) -> None:
        if trainer.is_world_process_zero():
            write_json_atomic(Path(self.output_dir, stage.name, STAGE_SUMMARY_FILE), self.summaries[-1])


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
    total_steps = optimizer_steps(num_train_examples, training_args, training_args.num_train_epochs)
    if method_args.stage1_adapter is not None:
        model = PeftModel.from_pretrained(load_model(), method_args.stage1_adapter, is_trainable=True)
    else:
        model = attach_adapters(load_model(), method_args, task_type, total_steps)
    recorder = RunRecorder(method_args, make_trainer, output_dir, stages)
    evaluate = None if selection_score is None else lambda _: selection_score(recorder.trainer)
    loop = StageLoop(make_trainer, training_args, method_args.prune_options(training_args.seed),
                     method_args.stage_options(), evaluate=evaluate, make_model=load_model, callbacks=[recorder])
    result = loop.run(model, stages)
    result.trainer.save_model(output_dir)
    prunes = [{"after_stage": s["name"], **s["prune"]} for s in recorder.summaries if "prune" in s]
    stage1_ranks = result.prune_reports[0].old_ranks if result.prune_reports else None
    return TrainingOutcome(result.model, result.trainer, recorder.summaries, stage1_ranks, result.prune_report, prunes)
