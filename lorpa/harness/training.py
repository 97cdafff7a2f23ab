"""The LoRPA stage schedule over any transformers Trainer, and the single-stage baselines.

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
import zipfile
from pathlib import Path
from typing import Callable

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import Trainer, TrainingArguments

from ..cli import UsageError
from ..layers import lora_layers
from ..pruning import PruneReport, check_prune_arguments, prune
from ..rewind import init_state_dict, load_init_state_dict
from ..sensitivity import SensitivityCallback, restore_sensitivity
from .adapters import AdaLoraAllocationCallback, attach_adapters
from .arguments import MethodArguments
from .outputs import write_json_atomic

PRUNED_ADAPTER_DIR = "pruned_adapter"
PRUNE_REPORT_FILE = "prune_report.json"
STAGE_SUMMARY_FILE = "stage_summary.json"


@dataclasses.dataclass
class Stage:
    name: str
    epochs: float
    max_steps: int = -1  # >= 0: the stage's share of --max_steps, which overrides epochs
    prune_to: int | None = None  # target rank of the prune after this stage (None: the prune flags decide)
    prunes: bool = False  # whether a prune follows this stage

    @property
    def trains(self) -> bool:
        return self.max_steps > 0 if self.max_steps >= 0 else self.epochs > 0


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
    return lorpa_stages(args.schedule(), num_train_epochs, max_steps, args.stage2_epochs)


def lorpa_stages(schedule: list[tuple[float, int | None]], num_train_epochs: float, max_steps: int = -1,
                 stage2_epochs: float | None = None) -> list[Stage]:
    """A stage per (fraction, target rank) of `schedule`, each followed by its prune, then the final stage
    (the rest of the budget, or `stage2_epochs`). With `max_steps` > 0 steps are shared out, not epochs."""

    def steps_until(fraction: float) -> int:
        return round(max_steps * fraction) if max_steps > 0 else 0

    stages, done = [], 0.0
    for index, (fraction, rank) in enumerate(schedule, start=1):
        steps = steps_until(fraction) - steps_until(done) if max_steps > 0 else -1
        stages.append(Stage(f"stage{index}", num_train_epochs * (fraction - done), steps, rank, prunes=True))
        done = fraction
    final_steps = max_steps - steps_until(done) if max_steps > 0 and stage2_epochs is None else -1
    final_epochs = num_train_epochs * (1 - done) if stage2_epochs is None else stage2_epochs
    return stages + [Stage(f"stage{len(stages) + 1}", final_epochs, final_steps)]


def stage_prune_kwargs(prune_kwargs: dict, stage: Stage) -> dict:
    """`lorpa.prune`'s options for the prune after `stage`: the run's, with the schedule's rank when it sets one."""
    return prune_kwargs if stage.prune_to is None else {**prune_kwargs, "target_rank": stage.prune_to, "ratio": None}


def prune_files(stages: list[Stage], index: int) -> tuple[str, str]:
    """(adapter folder, report file) of the prune after stage `index`: the last prune's keep the
    two-stage names, earlier ones are numbered by the stage they follow."""
    last = max(i for i, stage in enumerate(stages) if stage.prunes)
    if index == last:
        return PRUNED_ADAPTER_DIR, PRUNE_REPORT_FILE
    return f"{PRUNED_ADAPTER_DIR}_{index + 1}", f"prune_report_{index + 1}.json"


def optimizer_steps(num_examples: int, training_args: TrainingArguments, epochs: float) -> int:
    """Optimizer steps a Trainer will take (AdaLoRA needs its budget schedule up front)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    batches = math.ceil(num_examples / (training_args.per_device_train_batch_size * training_args.world_size))
    return max(1, math.ceil(epochs * math.ceil(batches / training_args.gradient_accumulation_steps)))


WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin")


def checkpoint_problem(path: Path) -> str | None:
    """Why a `checkpoint-N` folder cannot be resumed (None if it can).

    The Trainer writes trainer_state.json last, so a folder without a readable one was cut off while
    saving. Weight and optimizer files are checked for truncation by their headers, which is cheap.
    """
    try:
        json.loads(Path(path, "trainer_state.json").read_text())
    except (OSError, ValueError) as error:
        return f"no readable trainer_state.json ({type(error).__name__})"
    weights = [Path(path, name) for name in WEIGHT_FILES if Path(path, name).is_file()]
    if not weights:
        return "no model weights"
    for file in weights:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as error:  # safetensors raises its own error types for a damaged header
                return f"{file.name} is damaged ({str(error).strip().splitlines()[0]})"
    if not Path(path, "optimizer.pt").is_file() and not any(Path(path).glob("global_step*")):  # DeepSpeed's own layout
        return "no optimizer.pt"
    for file in sorted(f for f in Path(path).iterdir() if f.suffix in (".pt", ".pth", ".bin")):
        try:  # torch.save writes zip archives; a cut-off one has no central directory
            zipfile.ZipFile(file).close()
        except (OSError, zipfile.BadZipFile) as error:
            return f"{file.name} is damaged ({error})"
    return None


def find_resume_point(checkpoint: str | None, output_dir: str, stages: list[Stage]) -> tuple[int, str | None]:
    """(index of the stage to start in, checkpoint to resume it from).

    `checkpoint` is a path to a `checkpoint-N` folder inside a stage folder, or "latest": the newest
    complete checkpoint of the latest stage that has one; incomplete ones (a run killed while saving)
    are skipped with a message, and when all are incomplete the run starts from the beginning.
    """
    if checkpoint is None:
        return 0, None
    names = [stage.name for stage in stages]
    if checkpoint == "latest":
        skipped = False
        for index in reversed(range(len(stages))):
            found = sorted(
                Path(output_dir, names[index]).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
            )
            for path in reversed(found):
                problem = checkpoint_problem(path)
                if problem is None:
                    return index, str(path)
                print(f"skipping incomplete checkpoint {path}: {problem}", file=sys.stderr, flush=True)
                skipped = True
        if not skipped:
            raise UsageError(f"no checkpoint to resume under {output_dir}")
        print(f"no complete checkpoint under {output_dir}: training starts from the beginning", file=sys.stderr, flush=True)
        return 0, None
    path = Path(checkpoint)
    if not path.is_dir():
        raise UsageError(f"checkpoint not found: {checkpoint}")
    if path.parent.name not in names:
        raise UsageError(f"checkpoint {checkpoint} is not inside a stage folder ({', '.join(names)})")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UsageError(f"checkpoint {checkpoint} cannot be resumed: {problem}; resume from an earlier checkpoint "
                         "or pass --resume_from_checkpoint latest, which skips broken ones")
    return names.index(path.parent.name), str(path)


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
) -> TrainingOutcome:
    """Train every stage of the method, pruning after each stage that `plan_stages` says, and save the final model."""
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
                check_prune_arguments(model, **prune_kwargs)
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
            prune_report = prune(model, **stage_prune_kwargs(prune_kwargs, stage))
            # One write per line: replicas share stdout, and print's separate newline write interleaves.
            sys.stdout.write(pruning_summary(prune_report, trainer.args.process_index) + "\n")
            sys.stdout.flush()
            adapter_dir, report_file = prune_files(stages, index)
            trainer.save_model(str(Path(output_dir, adapter_dir)))
            next_args = dataclasses.replace(stage_args, output_dir=str(Path(output_dir, stages[index + 1].name)))
            after = _metrics(make_trainer(model, next_args).evaluate())
            summary["prune"] = {
                "ranks": prune_report.ranks,
                "mean_relative_error": prune_report.mean_relative_error,
                "before": {k: v for k, v in history[-1].items() if k not in ("epoch", "step")},
                "after": after,
            }
            if trainer.is_world_process_zero():
                write_json_atomic(Path(output_dir, report_file), prune_report.to_dict())
        summaries.append(summary)
        if trainer.is_world_process_zero():
            write_json_atomic(Path(stage_args.output_dir, STAGE_SUMMARY_FILE), summary)

    trainer.save_model(output_dir)
    prunes = [{"after_stage": s["name"], **s["prune"]} for s in summaries if "prune" in s]
    return TrainingOutcome(model, trainer, summaries, stage1_ranks, prune_report, prunes)
