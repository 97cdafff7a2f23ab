"""The method study's view of a table: paired differences against baseline rows, and what the prunes kept.

Seeds fix the data order and the initialisation, so two rows run with the same seed are paired: the
difference per seed (row − baseline), then its mean ± std over the seeds both rows have, is a sharper
comparison than two independent means. For LoRPA rows the last prune's mean relative error of ΔW and
the score right after it (before any retraining) show what the prune itself kept.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class Paired:
    """Mean ± sample std of per-seed differences; n is the number of seeds both rows have."""

    differences: list[float]

    @property
    def n(self) -> int:
        return len(self.differences)

    def text(self, decimals: int) -> str:
        mean = statistics.fmean(self.differences)
        if self.n == 1:
            return f"{mean:+.{decimals}f} (n=1)"
        return f"{mean:+.{decimals}f}±{statistics.stdev(self.differences):.{decimals}f}"


def _by_seed(runs, row: str) -> dict[tuple[str, str], float]:
    """{(column, seed): value} of one row; a repeated seed keeps its mean."""
    values = defaultdict(list)
    for run in runs:
        if run.row == row:
            for column, value in run.values.items():
                values[column, str(run.seed)].append(value)
    return {key: statistics.fmean(found) for key, found in values.items()}


def paired_differences(runs, rows: list[str], columns: list[str], baseline: str) -> dict[str, dict[str, Paired]]:
    """{row: {column: Paired}} of (row − baseline) over the seeds both have; rows without a shared seed are
    left out."""
    base = _by_seed(runs, baseline)
    result = {}
    for row in rows:
        if row == baseline:
            continue
        mine = _by_seed(runs, row)
        cells = {}
        for column in columns:
            differences = [mine[key] - base[key] for key in sorted(mine) if key[0] == column and key in base]
            if differences:
                cells[column] = Paired(differences)
        if cells:
            result[row] = cells
    return result


def prune_record(folder) -> dict | None:
    """The last prune of a run from its results.json: mean relative error and the metrics right after it."""
    try:
        prunes = json.loads((folder / "results.json").read_text()).get("prunes") or []
    except (OSError, ValueError):
        return None
    return prunes[-1] if prunes and isinstance(prunes[-1], dict) else None


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def paired_table(table, rows: list[str], baseline: str, decimals: int) -> list[str]:
    """Markdown: per row and column, (row − baseline) mean ± std over shared seeds."""
    differences = paired_differences(table.runs, rows, table.columns, baseline)
    if not differences:
        return []
    lines = [f"Paired differences against {baseline} (row − baseline per seed, mean±std over shared seeds):", "",
             "| Method | " + " | ".join(table.columns) + " |", "|---|" + "---:|" * len(table.columns)]
    for row, cells in differences.items():
        values = [cells[c].text(decimals) if c in cells else "" for c in table.columns]
        lines.append(f"| {_escape(row)} | " + " | ".join(values) + " |")
    return lines + [""]


def prune_table(table, rows: list[str], after_values, decimals: int) -> list[str]:
    """Markdown: per LoRPA row, the mean weight and output errors of the last prune and the scores right after it.

    `after_values(record_metrics, run) -> {column: value}` converts a prune's metrics to table units. The output
    error (on the calibration inputs) is shown for rows whose prunes were calibrated.
    """
    errors, outputs, after = defaultdict(list), defaultdict(list), defaultdict(lambda: defaultdict(list))
    agreements, kls = defaultdict(list), defaultdict(list)
    for run in table.runs:
        record = prune_record(run.folder)
        if record is None:
            continue
        fidelity = record.get("fidelity") or {}
        for key, found, source in (("mean_relative_error", errors, record), ("mean_output_error", outputs, record),
                                   ("agreement", agreements, fidelity), ("kl_mean", kls, fidelity)):
            if isinstance(source.get(key), (int, float)):
                found[run.row].append(source[key])
        for column, value in after_values(record.get("after") or {}, run).items():
            after[run.row][column].append(value)
    shown = [row for row in rows if row in errors or row in after]
    if not shown:
        return []
    fidelity = any(agreements.values()) or any(kls.values())  # runs that measured it (lorpa.fidelity)
    lines = ["What the last prune kept (before any retraining): mean relative error over modules of ΔW and, where "
             "the prune was calibrated, of ΔW·X on the calibration inputs; "
             + ("its fidelity to the uncut adapter on unlabelled training rows (% of top-1 answers unchanged, mean "
                "KL(uncut ‖ pruned)); " if fidelity else "")
             + "and the validation score right after the prune (mean over seeds):", "",
             "| Method | ΔW rel. error | ΔW·X rel. error | " + ("agreement % | KL | " if fidelity else "")
             + " | ".join(table.columns) + " |",
             "|---|---:|---:|" + ("---:|---:|" if fidelity else "") + "---:|" * len(table.columns)]
    for row in shown:
        cells = [f"{statistics.fmean(errors[row]):.3f}" if errors[row] else "",
                 f"{statistics.fmean(outputs[row]):.3f}" if outputs[row] else ""]
        if fidelity:
            cells += [f"{statistics.fmean(agreements[row]):.2f}" if agreements[row] else "",
                      f"{statistics.fmean(kls[row]):.2g}" if kls[row] else ""]
        cells += [f"{statistics.fmean(after[row][c]):.{decimals}f}" if after[row][c] else "" for c in table.columns]
        lines.append(f"| {_escape(row)} | " + " | ".join(cells) + " |")
    return lines + [""]
