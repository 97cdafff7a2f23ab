"""The budget of a prune: how many components each module keeps, and which.

A budget (`lorpa.PruneOptions`) is exactly one of `target_rank` (components kept per module; the average in global
scope), `ratio` (the fraction of every rank pruned), `total_rank` (components kept over all modules, global scope)
or `energy` (the share of the squared scores kept: per module in module scope, as peft's `convert_to_lora` reads a
float rank, or one threshold over all modules in global scope). Module scope keeps each module's top-scoring
components; global scope ranks the components of all modules together. Every module keeps at least `min_rank` and
at most `max_rank` (a serving cap; the budget it frees goes to the next components), and with `rank_multiple` M
every rank is a multiple of M (a module keeps whole blocks of M components, or its whole rank), as some serving
engines and kernels want.
"""

from __future__ import annotations

import torch

from .errors import InputError
from .options import PruneOptions


def check_fits(options: PruneOptions, shapes: dict[str, tuple[int, int, int]]) -> None:
    """Per module (rank, in_features, out_features): the budget fits every rank, and elementwise is defined."""
    components = sum(rank for rank, _, _ in shapes.values())
    if options.total_rank is not None and options.total_rank > components:
        raise InputError(f"total_rank {options.total_rank} exceeds the adapter's {components} rank components")
    for name, (rank, in_features, out_features) in shapes.items():
        if options.target_rank is not None and rank < options.target_rank:
            raise InputError(f"target_rank {options.target_rank} exceeds the rank of {name} ({rank})")
        if options.score == "elementwise" and in_features != out_features:
            raise InputError(f"{name}: the elementwise score needs in_features == out_features, got "
                             f"in={in_features}, out={out_features}")


def energy_rank(energies: torch.Tensor, energy: float) -> int:
    """The smallest k whose k largest energies hold `energy` of their sum (peft's `_find_cutoff_index`)."""
    ordered = torch.sort(energies.double(), descending=True).values
    cumulative = torch.cumsum(ordered, dim=0)
    k = int(torch.searchsorted(cumulative, energy * cumulative[-1]).item()) + 1
    return min(k, len(ordered))


def module_counts(scores: dict[str, torch.Tensor], options: PruneOptions) -> dict[str, int]:
    """Components each module keeps in module scope (the same rule everywhere, the paper's)."""
    counts = {}
    for name, values in scores.items():
        rank = len(values)
        if options.energy is not None:
            count = energy_rank(values.double().square(), options.energy)
        elif options.target_rank is not None:
            count = options.target_rank
        else:
            count = rank - round(rank * options.ratio)
        counts[name] = options.fit(count, rank)
    return counts


def _top(values: torch.Tensor, count: int) -> torch.Tensor:
    return torch.sort(values, descending=True, stable=True).indices[:count]


def choose(scores: dict[str, torch.Tensor], options: PruneOptions) -> dict[str, torch.Tensor]:
    """Per module the indices of the components kept (not sorted), by the options' budget and scope: scores are
    float32 CPU tensors, one per component; higher scores are kept first, ties go to the lower index and then to
    the earlier module."""
    if options.scope == "module":
        counts = module_counts(scores, options)
        return {name: _top(values, counts[name]) for name, values in scores.items()}
    return _choose_global(scores, options)


def _choose_global(scores: dict[str, torch.Tensor], options: PruneOptions) -> dict[str, torch.Tensor]:
    """One budget over all modules, in blocks of rank_multiple components taken in each module's own order.

    Each module first keeps its reserved blocks (min_rank); the other blocks are ranked together by their
    summed scores (by their summed squared scores for an energy budget) and taken while the budget lasts,
    every module's blocks in order and never past max_rank. Block sums come from one cumulative sum per
    module, so the greedy walk itself is plain Python over numbers.
    """
    step, energy_budget = options.rank_multiple, options.energy is not None
    orders, candidates, kept, next_block, held_components, held_energy = {}, [], {}, {}, 0, 0.0
    for position, (name, values) in enumerate(scores.items()):
        lower, upper = options.bounds(len(values))
        order = torch.sort(values, descending=True, stable=True).indices[:upper]
        orders[name] = order
        ordered = values[order].double()
        edges = list(range(0, len(order), step)) + [len(order)]
        sums = torch.cumsum(torch.cat([ordered.new_zeros(1), ordered]), 0)
        squares = torch.cumsum(torch.cat([ordered.new_zeros(1), ordered.square()]), 0)
        block_sums = (sums[edges[1:]] - sums[edges[:-1]]).tolist()
        block_energies = (squares[edges[1:]] - squares[edges[:-1]]).tolist()
        reserved = min(-(-lower // step), len(block_sums))
        kept[name] = edges[reserved]  # components taken so far: always a prefix of `order`
        next_block[name] = reserved
        held_components += edges[reserved]
        held_energy += float(squares[edges[reserved]])
        for index in range(reserved, len(block_sums)):
            value = block_energies[index] if energy_budget else block_sums[index]
            candidates.append((-value, position, index, name, edges[index + 1] - edges[index], block_energies[index]))
    candidates.sort(key=lambda c: c[:3])
    if energy_budget:
        goal = options.energy * sum(float(values.double().square().sum()) for values in scores.values())
    else:
        goal = _component_budget(scores, options)
        if goal < held_components:
            raise InputError(f"a budget of {goal} components cannot give every module its min_rank "
                             f"({held_components} in all)")
    for _, _, index, name, size, energy in candidates:
        if (held_energy >= goal - 1e-12 * abs(goal)) if energy_budget else held_components >= goal:
            break
        if index != next_block[name] or (not energy_budget and held_components + size > goal):
            continue
        kept[name] += size
        next_block[name] += 1
        held_components += size
        held_energy += energy
    return {name: orders[name][: kept[name]] for name in scores}


def _component_budget(scores: dict[str, torch.Tensor], options: PruneOptions) -> int:
    """Components kept over all modules: the sum of what module scope would keep, or total_rank."""
    if options.total_rank is not None:
        return options.total_rank
    counts = []
    for values in scores.values():
        rank = len(values)
        count = options.target_rank if options.target_rank is not None else rank - round(rank * options.ratio)
        counts.append(min(rank, max(options.min_rank, count)))
    return sum(counts)


def parameters(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> int:
    """Adapter parameters at these ranks: k·(in + out) per module, for (in, out) shapes."""
    return sum(ranks[name] * (shape[0] + shape[1]) for name, shape in shapes.items())


def energy_kept(energies: torch.Tensor, count: int) -> float:
    """Share of the energies the `count` largest hold (1 for an all-zero module)."""
    total = float(energies.double().sum())
    return 1.0 if total == 0 else float(torch.sort(energies.double(), descending=True).values[:count].sum()) / total
