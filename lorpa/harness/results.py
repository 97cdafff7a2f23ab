"""results.json: one file per run, the unit that `lorpa.report` aggregates."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoints import write_json_atomic
from ..options import REPORTED
from ..stages import RESULTS_FILE

if TYPE_CHECKING:  # the report command reads results without the training stack
    from .training import TrainingOutcome


def best_and_last(history: list[dict], main_metric: str) -> tuple[dict, dict]:
    """(best evaluation by `main_metric`, last evaluation) of one stage's history."""
    scored = [entry for entry in history if main_metric in entry]
    if not scored:
        raise RuntimeError(f"no evaluation reported {main_metric!r}")
    return max(scored, key=lambda entry: entry[main_metric]), scored[-1]


def results_record(outcome: TrainingOutcome, *, task: str, model: str, method: str, seed: int,
                   main_metric: str, config: dict, selection_metric: str | None = None) -> dict:
    """The best validation score of the final stage is what the paper reports; the last is kept too.

    With a selection split (`selection_metric`), `selected_metrics` is the evaluation whose selection
    score is best: the validation score there was not used to choose the epoch.
    """
    final = outcome.stages[-1]
    best, last = best_and_last(final["history"], main_metric)
    selected = None if selection_metric is None else best_and_last(final["history"], selection_metric)[0]
    report = outcome.prune_report
    if report is not None and not isinstance(report, dict):
        report = report.to_dict()
    return {
        "task": task,
        "model": model,
        "method": method,
        "seed": seed,
        "main_metric": main_metric,
        "metrics": last,
        "best_metrics": best,
        "selection_metric": selection_metric,
        "selected_metrics": selected,
        "trainable_params": final["trainable_params"],
        "head_params": final.get("head_params"),
        "ranks": final["ranks"],
        "stage1_ranks": outcome.stage1_ranks,
        "prune": None if report is None else {k: report.get(k) for k in REPORTED},
        "fidelity": None if report is None else report.get("fidelity"),
        "prunes": outcome.prunes,
        "train_runtime_s": sum(stage["train_runtime_s"] for stage in outcome.stages),
        "stages": outcome.stages,
        "config": config,
    }


def run_config(config_path: str | None, training_args, *argument_groups) -> dict:
    """Everything that defined a run, for results.json: the YAML file, every script flag, the TrainingArguments."""
    config = {"config_file": config_path}
    for group in argument_groups:
        config.update(dataclasses.asdict(group))
    config["training"] = training_args.to_dict()
    return config


def write_results(output_dir: str, record: dict) -> Path:
    path = Path(output_dir, RESULTS_FILE)
    write_json_atomic(path, record)
    return path
