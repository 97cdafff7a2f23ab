"""The budget of a prune: how many components each module keeps, and which.

A budget is exactly one of `target_rank` (components kept per module; the average in global scope),
`ratio` (the fraction of every rank pruned), `total_rank` (components kept over all modules, global
scope) or `energy` (the share of the squared scores kept: per module in module scope, as peft's
`convert_to_lora` reads a float rank, or one threshold over all modules in global scope). Module scope
keeps each module's top-scoring components; global scope ranks the components of all modules together.
Every module keeps at least `min_rank` and at most `max_rank` (a serving cap; the budget it frees goes to
the next components), and with `rank_multiple` M every rank is a multiple of M (a module keeps whole
blocks of M components, or its whole rank), as some serving engines and kernels want.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AMOUNTS = ("target_rank", "ratio", "total_rank", "energy")


@dataclass(frozen=True)
class Budget:
    target_rank: int | None = None
    ratio: float | None = None
    total_rank: int | None = None
    energy: float | None = None
    min_rank: int = 1
    max_rank: int | None = None
    rank_multiple: int = 1

    def check(self, scope: str) -> None:
        """The budget's own consistency; ValueError names the problem."""
        given = [name for name in AMOUNTS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("pass exactly one of target_rank (ranks kept per module), ratio (fraction pruned), "
                             f"total_rank (components kept in all) or energy (share of the squared scores kept); got {given or 'none'}")
        for name in ("min_rank", "rank_multiple"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_rank is not None and (not _positive_int(self.max_rank) or self.max_rank < self.min_rank):
            raise ValueError(f"max_rank must be an integer >= min_rank ({self.min_rank}), got {self.max_rank!r}")
        for name in ("min_rank", "max_rank"):
            value = getattr(self, name)
            if value is not None and self.rank_multiple > 1 and value % self.rank_multiple and not (name == "min_rank" and value == 1):
                raise ValueError(f"{name} ({value}) must be a multiple of rank_multiple ({self.rank_multiple})")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.energy is not None and (isinstance(self.energy, bool) or not 0 < self.energy <= 1):
            raise ValueError(f"energy must be in (0, 1], got {self.energy!r}")
        if self.target_rank is not None and (not _positive_int(self.target_rank) or self.target_rank < self.min_rank):
            raise ValueError(f"target_rank must be an integer >= min_rank ({self.min_rank}), got {self.target_rank!r}")
        if self.total_rank is not None:
            if not _positive_int(self.total_rank):
                raise ValueError(f"total_rank must be a positive integer, got {self.total_rank!r}")
            if scope != "global":
                raise ValueError("total_rank is a budget over all modules: use it with scope='global'")

    def bounds(self, rank: int) -> tuple[int, int]:
        """(fewest, most) components a module of rank `rank` may keep."""
        upper = rank if self.max_rank is None else min(rank, self.max_rank)
        return min(self.min_rank, upper), upper

    def fit(self, count: int, rank: int) -> int:
        """`count` moved into the module's bounds and up to a multiple of rank_multiple (or the whole rank)."""
        lower, upper = self.bounds(rank)
        step = self.rank_multiple
        count = min(max(count, lower), upper)
        count = -(-count // step) * step
        if count > upper:
            count = upper if upper == rank else upper // step * step
        return count


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def energy_rank(energies: torch.Tensor, energy: float) -> int:
    """The smallest k whose k largest energies hold `energy` of their sum (peft's `_find_cutoff_index`)."""
    ordered = torch.sort(energies.double(), descending=True).values
    cumulative = torch.cumsum(ordered, dim=0)
    k = int(torch.searchsorted(cumulative, energy * cumulative[-1]).item()) + 1
    return min(k, len(ordered))


def module_counts(scores: dict[str, torch.Tensor], budget: Budget) -> dict[str, int]:
    """Components each module keeps in module scope (the same rule everywhere, the paper's)."""
    counts = {}
    for name, values in scores.items():
        rank = len(values)
        if budget.energy is not None:
            count = energy_rank(values.double().square(), budget.energy)
        elif budget.target_rank is not None:
            count = budget.target_rank
        else:
            count = rank - round(rank * budget.ratio)
        counts[name] = budget.fit(count, rank)
    return counts


def _top(values: torch.Tensor, count: int) -> torch.Tensor:
    return torch.sort(values, descending=True, stable=True).indices[:count]


def choose(scores: dict[str, torch.Tensor], budget: Budget, scope: str) -> dict[str, torch.Tensor]:
    """Per module the indices of the components kept (not sorted): scores are float32 CPU tensors, one per
    component; higher scores are kept first, ties go to the lower index and then to the earlier module."""
    if scope == "module":
        counts = module_counts(scores, budget)
        return {name: _top(values, counts[name]) for name, values in scores.items()}
    return _choose_global(scores, budget)


def _choose_global(scores: dict[str, torch.Tensor], budget: Budget) -> dict[str, torch.Tensor]:
    """One budget over all modules, in blocks of rank_multiple components taken in each module's own order.

    Each module first keeps its reserved blocks (min_rank); the other blocks are ranked together by their
    summed scores (by their summed squared scores for an energy budget) and taken while the budget lasts,
    every module's blocks in order and never past max_rank. Block sums come from one cumulative sum per
    module, so the greedy walk itself is plain Python over numbers.
    """
    step, energy_budget = budget.rank_multiple, budget.energy is not None
    orders, candidates, kept, next_block, held_components, held_energy = {}, [], {}, {}, 0, 0.0
    for position, (name, values) in enumerate(scores.items()):
        lower, upper = budget.bounds(len(values))
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
        goal = budget.energy * sum(float(values.double().square().sum()) for values in scores.values())
    else:
        goal = _component_budget(scores, budget)
        if goal < held_components:
            raise ValueError(f"a budget of {goal} components cannot give every module its min_rank ({held_components} in all)")
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


def _component_budget(scores: dict[str, torch.Tensor], budget: Budget) -> int:
    """Components kept over all modules: the sum of what module scope would keep, or total_rank."""
    if budget.total_rank is not None:
        return budget.total_rank
    counts = []
    for values in scores.values():
        rank = len(values)
        count = budget.target_rank if budget.target_rank is not None else rank - round(rank * budget.ratio)
        counts.append(min(rank, max(budget.min_rank, count)))
    return sum(counts)


def parameters(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> int:
    """Adapter parameters at these ranks: k·(in + out) per module, for (in, out) shapes."""
    return sum(ranks[name] * (shape[0] + shape[1]) for name, shape in shapes.items())


def energy_kept(energies: torch.Tensor, count: int) -> float:
    """Share of the energies the `count` largest hold (1 for an all-zero module)."""
    total = float(energies.double().sum())
    return 1.0 if total == 0 else float(torch.sort(energies.double(), descending=True).values[:count].sum()) / total
