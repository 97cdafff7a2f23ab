"""The statistics of a table: runs grouped by benchmark and model, rows by method, cells of seeds (mean or
median ± std), the rank curves, and a sweep's unfinished cells counted where they belong."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .results import RESULTS_FILE
from .runs import DATASET_NAMES, GLUE_COLUMNS, MATH_TASKS, ROUGE_COLUMNS, Run, family, metric_values, task_name, warn
from .sweep.cells import read_manifest

# --stat: how seeds are combined (LoRA reports the median of 5 seeds, AdaLoRA the mean).
STATISTICS = {"mean": statistics.fmean, "median": statistics.median}


@dataclass
class Table:
    benchmark: str
    model: str
    columns: list[str]
    runs: list[Run]


def column_key(column: str) -> tuple:
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
        columns = sorted({c for run in members for c in run.values}, key=column_key)
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


def usual_seeds(rows: list[dict]) -> int | None:
    """The most common number of seeds per cell in a table."""
    counts = [c.n for row in rows for c in row["cells"].values()]
    return max(set(counts), key=lambda n: (counts.count(n), n)) if counts else None


def seed_counts(cells: dict[str, Cell]) -> str:
    counts = sorted({c.n for c in cells.values()})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def warn_duplicates(table: Table) -> None:
    seen = defaultdict(list)
    for run in table.runs:
        seen[run.row, run.task, str(run.seed)].append(run.folder)
    for (row, task, seed), folders in seen.items():
        if len(folders) > 1:
            where = ", ".join(map(str, folders))
            warn(f"{row}, {task_name(task)}, seed {seed} has {len(folders)} runs, all averaged: {where}")


def after_prune_values(metrics: dict, run: Run) -> dict[str, float]:
    """A prune's post-prune metrics in the table's units (none when they lack the table's metric)."""
    try:
        return metric_values({"task": run.task}, metrics)[1]
    except (ValueError, KeyError):
        return {}


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
