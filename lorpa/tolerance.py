"""Size by tolerance: the smallest adapter whose score stays within `tolerance` of the unpruned adapter's.

A cut at the end of training needs no retraining, so each candidate costs one truncation and one
evaluation. The score is close to monotone in the budget, so the budget (rank components kept over all
modules, one global ranking) is found by bisection, about log2 of the adapter's total rank evaluations,
and every candidate is recorded. Evaluate on data held out from training and from the reported split
(a selection split), or the choice is made on the numbers it reports.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn

from .budgets import Budget, parameters
from .calibration import CALIBRATION_ATTR
from .layers import factors, lora_layers, resolve_adapter, unwrap
from .pruning import PruneReport, prune
from .rewind import SNAPSHOT_ATTR
from .sensitivity import SENSITIVITY_ATTR


@dataclass
class Candidate:
    total_rank: int  # rank components kept over all modules
    parameters: int  # adapter parameters at those ranks
    score: float


@dataclass
class ToleranceSearch:
    reference: float  # the unpruned adapter's score
    tolerance: float
    full_rank: int  # the unpruned adapter's total rank
    full_parameters: int
    candidates: list[Candidate] = field(default_factory=list)  # in the order they were evaluated
    kept: int | None = None  # total rank of the adapter kept
    within: bool = True  # False: no budget a cap (max_rank) allows stays within the tolerance; the largest is kept

    def to_dict(self) -> dict:
        return asdict(self)


def search_budget(evaluate: Callable[[int], Candidate], lowest: int, highest: int, full_rank: int,
                  full_parameters: int, reference: float, tolerance: float) -> ToleranceSearch:
    """Bisection over total ranks in [lowest, highest] for the smallest whose score is >= reference − tolerance.

    `evaluate(budget)` truncates to `budget` components and scores the result. The unpruned adapter (highest ==
    full_rank) qualifies by definition and is not evaluated again; a lower `highest` (a rank cap) is tried first.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    search = ToleranceSearch(reference, tolerance, full_rank, full_parameters)
    low, high = lowest, highest  # `high` qualifies
    if highest < full_rank:
        capped = evaluate(highest)
        search.candidates.append(capped)
        if capped.score < reference - tolerance:
            search.kept, search.within = highest, False
            return search
    while low < high:
        middle = (low + high) // 2
        candidate = evaluate(middle)
        search.candidates.append(candidate)
        if candidate.score >= reference - tolerance:
            high = middle
        else:
            low = middle + 1
    search.kept = high
    return search


class AdapterState:
    """Everything a prune changes on a model, kept so that every candidate starts from the same unpruned adapter."""

    def __init__(self, model: nn.Module, adapter_name: str):
        self.model, self.adapter_name = model, adapter_name
        self.layers = {}
        for name, layer in lora_layers(model, adapter_name).items():
            lora_A, lora_B = factors(layer, adapter_name)
            extras = {attr: copy.copy(layer.__dict__.get(attr, {}).get(adapter_name)) for attr in (CALIBRATION_ATTR, SENSITIVITY_ATTR, SNAPSHOT_ATTR)}
            self.layers[name] = (lora_A.detach().clone(), lora_B.detach().clone(), layer.r[adapter_name],
                                 layer.lora_alpha[adapter_name], layer.scaling[adapter_name],
                                 layer.use_rslora.get(adapter_name, False), extras)
        self.config = copy.deepcopy(model.peft_config[adapter_name])

    def restore(self) -> None:
        for name, layer in lora_layers(self.model, self.adapter_name).items():
            lora_A, lora_B, rank, alpha, scale, rslora, extras = self.layers[name]
            module_A, module_B = layer.lora_A[self.adapter_name], layer.lora_B[self.adapter_name]
            module_A.weight = nn.Parameter(lora_A.clone(), requires_grad=module_A.weight.requires_grad)
            module_B.weight = nn.Parameter(lora_B.clone(), requires_grad=module_B.weight.requires_grad)
            module_A.out_features = module_B.in_features = rank
            layer.r[self.adapter_name], layer.lora_alpha[self.adapter_name] = rank, alpha
            layer.scaling[self.adapter_name], layer.use_rslora[self.adapter_name] = scale, rslora
            for attr, value in extras.items():
                if value is not None:
                    layer.__dict__.setdefault(attr, {})[self.adapter_name] = copy.copy(value)
        self.model.peft_config[self.adapter_name] = copy.deepcopy(self.config)


def prune_to_tolerance(model: nn.Module, evaluate: Callable[[nn.Module], float], tolerance: float, *,
                       score: str = "svd", min_rank: int = 1, max_rank: int | None = None, rank_multiple: int = 1,
                       adapter_name: str | None = None, **options) -> tuple[PruneReport, ToleranceSearch]:
    """Prune `model` in place to the smallest global budget whose `evaluate(model)` score is within `tolerance` of
    the unpruned model's; the other options are `lorpa.prune`'s (its budget is what this chooses).

    evaluate(model) -> float: higher is better, in the units of `tolerance` (e.g. accuracy × 100 and 0.5 points).
    """
    model = unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    layers = lora_layers(model, adapter_name)
    shapes = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
    ranks = {name: layer.r[adapter_name] for name, layer in layers.items()}
    budget = Budget(total_rank=1, min_rank=min_rank, max_rank=max_rank, rank_multiple=rank_multiple)
    lowest = sum(budget.bounds(rank)[0] for rank in ranks.values())
    highest = sum(budget.bounds(rank)[1] for rank in ranks.values())
    kwargs = dict(score=score, scope="global", min_rank=min_rank, max_rank=max_rank, rank_multiple=rank_multiple,
                  adapter_name=adapter_name, **options)
    state = AdapterState(model, adapter_name)
    reference = float(evaluate(model))

    def candidate(total_rank: int) -> Candidate:
        state.restore()
        report = prune(model, total_rank=total_rank, **kwargs)
        return Candidate(sum(report.ranks.values()), parameters(shapes, report.ranks), float(evaluate(model)))

    search = search_budget(candidate, lowest, highest, sum(ranks.values()), parameters(shapes, ranks), reference, tolerance)
    state.restore()
    return prune(model, total_rank=search.kept, **kwargs), search
