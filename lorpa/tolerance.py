"""Size by tolerance: the smallest adapter whose score stays within `tolerance` of the unpruned adapter's.

A cut at the end of training needs no retraining, so each candidate costs one truncation and one evaluation. The
score is close to monotone in the budget, so the budget (rank components kept over all modules, one global
ranking) is found by bisection, about log2 of the adapter's total rank evaluations, and every candidate is
recorded. Evaluate on data held out from training and from the reported split (a selection split), or the choice
is made on the numbers it reports. `lorpa.prune_to_tolerance` searches a live model; `prune_saved_adapter_to_tolerance`
a saved adapter, scoring each candidate folder with a command.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from .adapter_files import (
    TOLERANCE_FILE,
    AdapterFolder,
    files_options,
    progress,
    pruned_config,
    staging_folder,
    write_pruned_adapter,
)
from .budgets import parameters
from .card import model_card_of
from .errors import InputError
from .hub import resolve_adapter
from .options import PruneOptions
from .plan import build_plan, choose_kept, score_modules


@dataclass
class Candidate:
    total_rank: int  # rank components kept over all modules
    parameters: int  # adapter parameters at those ranks
    score: float


@dataclass
class ToleranceSearch:
    reference: float  # the unpruned adapter's score (agreement: 100; kl: 0)
    tolerance: float
    full_rank: int  # the unpruned adapter's total rank
    full_parameters: int
    candidates: list[Candidate] = field(default_factory=list)  # in the order they were evaluated
    kept: int | None = None  # total rank of the adapter kept
    within: bool = True  # False: no budget a cap (max_rank) allows stays within the tolerance; the largest is kept
    metric: str = "score"  # what the candidates' `score` is: a labelled score, agreement (%) or mean KL

    def to_dict(self) -> dict:
        return asdict(self)

    def kept_candidate(self) -> Candidate | None:
        """The candidate kept (None when it is the unpruned adapter, which is not evaluated again)."""
        return next((c for c in self.candidates if c.total_rank == self.kept), None)


def search_budget(evaluate: Callable[[int], Candidate], lowest: int, highest: int, full_rank: int,
                  full_parameters: int, reference: float, tolerance: float, metric: str = "score") -> ToleranceSearch:
    """Bisection over total ranks in [lowest, highest] for the smallest that qualifies: by `metric`, a score >=
    reference − tolerance, an agreement >= tolerance (percent), or a mean KL <= tolerance.

    `evaluate(budget)` truncates to `budget` components and scores the result. The unpruned adapter (highest ==
    full_rank) qualifies by definition and is not evaluated again; a lower `highest` (a rank cap) is tried first.
    """
    for name, value in (("tolerance", tolerance), ("the unpruned adapter's score", reference)):
        if not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value}")
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0, got {tolerance}")
    search = ToleranceSearch(reference, tolerance, full_rank, full_parameters, metric=metric)
    low, high = lowest, highest  # `high` qualifies

    def qualifies(value: float) -> bool:
        if metric == "kl":
            return value <= tolerance
        return value >= (tolerance if metric == "agreement" else reference - tolerance)

    def scored(budget: int) -> Candidate:
        candidate = evaluate(budget)
        if not math.isfinite(candidate.score):
            raise InputError(f"the candidate of total rank {budget} scored {candidate.score}; scores must be finite")
        search.candidates.append(candidate)
        return candidate

    if highest < full_rank and not qualifies(scored(highest).score):
        search.kept, search.within = highest, False
        return search
    while low < high:
        middle = (low + high) // 2
        if qualifies(scored(middle).score):
            high = middle
        else:
            low = middle + 1
    search.kept = high
    return search


def run_evaluation(command: list[str], adapter: Path) -> float:
    """The score `command` prints as the last word of its output for `adapter` (each `{adapter}` in it is replaced
    by the folder); it must be a finite number."""
    argv = [part.replace("{adapter}", str(adapter)) for part in command]
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except OSError as error:
        raise InputError(f"--evaluate: cannot run {argv[0]}: {error.strerror or error}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        raise InputError(f"--evaluate exited {done.returncode} on {adapter}: {last}")
    lines = done.stdout.strip().splitlines()
    try:
        score = float(lines[-1].split()[-1])
    except (IndexError, ValueError):
        raise InputError(f"--evaluate printed no score on its last line for {adapter} (it must end with a "
                         "number)") from None
    if not math.isfinite(score):
        raise InputError(f"--evaluate printed {lines[-1].split()[-1]} for {adapter}; the score must be a finite "
                         "number")
    return score


def prune_saved_adapter_to_tolerance(adapter: str | os.PathLike, output_dir: str | os.PathLike, evaluate,
                                     options: PruneOptions | None = None, *, overwrite: bool = False,
                                     revision: str | None = None, **keywords):
    """The smallest global budget whose candidate folder qualifies (`lorpa.tolerance.search_budget`), from the input
    adapter (a folder, or a Hub repo id at `revision`); every candidate goes to OUTPUT_DIR/tolerance_search.json.
    `evaluate`: a command that prints a score (`{adapter}` standing for the folder), a function of the folder, or a
    `lorpa.fidelity.AdapterComparison` for the label-free metrics (agreement, kl). Returns (prune report, search)."""
    source = resolve_adapter(str(adapter), revision, keywords.pop("subfolder", None))
    options, _, output_dir = files_options(source.folder, output_dir, options, keywords, overwrite)
    if options.tolerance is None:
        raise InputError("a tolerance search needs tolerance: how close to the input a candidate must stay")
    if not evaluate:
        raise InputError("--tolerance needs --evaluate COMMAND, which prints a score for the adapter folder {adapter}")
    compare = evaluate if hasattr(evaluate, "measure") else None
    metric = options.search_metric(compare is None)
    if compare is not None:
        from .fidelity import label_free_metric, measured

        if metric == "score":
            raise InputError("tolerance_metric score needs --evaluate COMMAND (a labelled score)")
        metric = label_free_metric(metric, compare.recorded)
        score_of = lambda folder: measured(compare.measure(folder), metric)  # noqa: E731
    else:
        score_of = evaluate if callable(evaluate) else partial(run_evaluation, evaluate)
    folder = AdapterFolder(source.folder)
    shapes = {name: (m.in_features, m.out_features) for name, m in folder.modules.items()}
    ranks = {name: m.rank for name, m in folder.modules.items()}
    scored = score_modules(folder.module_factors(), options, trim=True)
    bar = progress(None, "tolerance search", unit="candidate")

    def plan(components: int):
        budget = options.at_total(components)
        return build_plan(scored, budget, choose_kept(scored, budget))

    def candidate(components: int) -> Candidate:
        planned = plan(components)
        staging = staging_folder(output_dir, "candidate")
        try:
            target = staging / "adapter"
            write_pruned_adapter(folder, planned, target, pruned_config(folder, planned.report))
            kept = planned.report.ranks
            bar.update()
            return Candidate(sum(kept.values()), parameters(shapes, kept), score_of(target))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    search = search_budget(candidate, sum(options.bounds(r)[0] for r in ranks.values()),
                           sum(options.bounds(r)[1] for r in ranks.values()), sum(ranks.values()),
                           parameters(shapes, ranks), score_of(folder.folder), options.tolerance, metric)
    bar.close()
    final = plan(search.kept)
    config = pruned_config(folder, final.report)
    card = model_card_of(folder, final, config, source, compare)
    record = json.dumps(search.to_dict(), indent=2) + "\n"
    write_pruned_adapter(folder, final, output_dir, config, lambda staged: {**card(staged), TOLERANCE_FILE: record})
    return final.report, search
