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
import os
from pathlib import Path
from urllib.parse import quote

from ..cli import check_output_file
from ..errors import InputError
from ..stages import PRUNE_REPORT_FILE
from .results import RESULTS_FILE
from .runs import METRICS, collect_runs, model_title, run_key, task_name, warn
from .study import paired_table, prune_table
from .tables import (
    STATISTICS,
    Cell,
    Table,
    after_prune_values,
    build_tables,
    column_key,
    mark_unfinished,
    rank_curves,
    seed_counts,
    table_rows,
    usual_seeds,
    warn_duplicates,
)

PLOT_FILE = "rank_plot.png"


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
    seeds = usual_seeds(rows)
    for row in rows:
        cells = [format_cell(row["cells"].get(c), decimals, stat, seeds) for c in table.columns]
        if avg:
            cells.append("" if row["avg"] is None else f"{row['avg']:.{decimals}f}")
        params = [format_params(row["params"])]
        if without_head:
            params.append("" if row["params_without_head"] is None else format_params(row["params_without_head"]))
        if adapter:
            params.append("" if row["adapter_params"] is None else format_params(row["adapter_params"], 1e6))
        line = [_escape(row["label"]), *params, *cells, seed_counts(row["cells"])]
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
        warn(f"no {PRUNE_REPORT_FILE} in {folder}; no rank plot")
        return None
    if plot_path.is_file() and plot_path.stat().st_mtime >= report_path.stat().st_mtime:
        return plot_path
    try:
        from .plots import plot_prune_report  # matplotlib: imported when a plot is drawn

        return plot_prune_report(json.loads(report_path.read_text()), plot_path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        warn(f"cannot plot {report_path}: {type(error).__name__}: {error}")
        return None


def plot_links(table: Table, md_dir: Path) -> list[str]:
    runs = sorted((r for r in table.runs if r.method == "lorpa"), key=run_key)
    links = []
    for run in runs:
        plot = ensure_plot(run.folder)
        if plot is not None:
            target = quote(Path(os.path.relpath(plot, md_dir)).as_posix())
            links.append(f"- {_escape(run.row)}, {task_name(run.task)}, seed {run.seed}: [{PLOT_FILE}]({target})")
    return ["", "Rank plots (surviving rank per module, score distribution):", "", *links] if links else []


def study_sections(table: Table, body: list[dict], paired: list[str]) -> list[str]:
    """Paired differences against each `paired` row present, and what the LoRPA rows' prunes kept."""
    decimals = 1 if table.benchmark == "GLUE" else 2
    labels = [row["label"] for row in body]
    lines = []
    for baseline in paired:
        if baseline in labels:
            lines += paired_table(table, labels, baseline, decimals)
    return lines + prune_table(table, labels, after_prune_values, decimals)


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
    columns = sorted({c for t in tables for c in t.columns}, key=column_key)
    header = ["benchmark", "model", "method", "params", "params_without_head", "adapter_params"]
    header += [f"{c} {name}" for c in columns for name in (stat, "std", "n")] + ["avg"]
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        for table, body in zip(tables, rows):
            for row in body:
                sizes = [row["params"], *("" if row[key] is None else row[key]
                                          for key in ("params_without_head", "adapter_params"))]
                line = [table.benchmark, model_title(table.model), row["label"], *sizes]
                for column in columns:
                    value = row["cells"].get(column)
                    if value is None:
                        line += ["", "", ""]
                    else:
                        line += [value.stat(stat), "" if value.std is None else value.std, value.n]
                line.append("" if row["avg"] is None else row["avg"])
                writer.writerow(line)


def build_parser(prog: str = "python -m lorpa.report") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
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


def main(argv: list[str] | None = None, prog: str = "python -m lorpa.report") -> None:
    args = build_parser(prog).parse_args(argv)
    if not args.runs_dir.is_dir():
        raise InputError(f"{args.runs_dir} is not a folder")
    prefix = args.out if args.out is not None else args.runs_dir / "summary"
    for path, flag in ((prefix.with_name(prefix.name + ".md"), "--out"), (args.curve, "--curve")):
        if path is not None:
            check_output_file(str(path), flag, make_folder=True)
    tables = build_tables(collect_runs(args.runs_dir, args.metric))
    for table in tables:
        warn_duplicates(table)
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
            raise InputError("--curve: no row family with two ranks or more"
                             f"{' among --curve_rows' if args.curve_rows else ''}")
        reference = {row["label"]: {c: v.mean for c, v in row["cells"].items()} for row in rows[0]
                     if row["label"] == args.curve_reference}
        from .curves import plot_rank_curve

        print(f"rank curve: {plot_rank_curve(lines, tables[0].columns, args.curve, reference)}")
