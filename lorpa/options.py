"""Every option of a prune, in one object: `PruneOptions`, validated once, each field documented once.

`lorpa.prune`, `lorpa.prune_saved_adapter`, `lorpa.prune_to_tolerance` and `lorpa.train_two_stage` take it; the
command-line flags of `lorpa prune` are made from its fields (`add_prune_arguments`) and the run scripts' flags
take its help texts, so an option's meaning is written here and nowhere else. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from .errors import InputError

SCORES = ("magnitude", "elementwise", "random", "svd", "sensitivity", "activation")
ROTATED_SCORES = ("svd", "activation")  # scores that first rewrite each update in another basis of itself
FILE_SCORES = ("magnitude", "elementwise", "random", "svd")  # need only the saved A and B
SCOPES = ("module", "global")
REWINDS = ("none", "init")
ALPHA_MODES = ("keep_scaling", "fold")  # or a number
SVD_SPLITS = ("balanced", "orthonormal_a")
GLOBAL_NORMS = ("absolute", "relative")
TOLERANCE_METRICS = ("score", "agreement", "kl")
BUDGETS = ("target_rank", "ratio", "total_rank", "energy", "tolerance")
REPORTED = ("score", "scope", "rewind", "svd_split", "global_norm")  # the settings a prune report records


@dataclass(frozen=True)
class PruneOptions:
    """How a prune chooses what to keep. The budget is one of `target_rank`, `ratio`, `total_rank`, `energy` or
    `tolerance`; every other field has a default. Bad values raise `lorpa.InputError` when the object is made."""

    target_rank: int | None = field(default=None, metadata={
        "help": "rank components kept per module (module scope) or on average (global scope)"})
    ratio: float | None = field(default=None, metadata={"help": "fraction of each module's rank pruned, in [0, 1)"})
    total_rank: int | None = field(default=None, metadata={
        "help": "rank components kept over all modules (global scope)"})
    energy: float | None = field(default=None, metadata={
        "help": "with a rotated score (svd, activation): the share of the components' squared amplitudes kept, in "
                "(0, 1]: per module in module scope (as peft's convert_to_lora takes a float rank), one threshold "
                "over all modules in global scope"})
    tolerance: float | None = field(default=None, metadata={
        "help": "the smallest global budget that stays close to the unpruned adapter (a search: each candidate is cut "
                "and evaluated), by tolerance_metric: within this many points of its score, or with at least this "
                "percent of top-1 answers unchanged (agreement), or at most this mean KL (kl)"})
    tolerance_metric: str | None = field(default=None, metadata={
        "metavar": "|".join(TOLERANCE_METRICS),
        "help": "what a tolerance search holds candidates to: score (a labelled evaluation: points below the "
                "unpruned adapter's), or, with no labels, agreement (percent of the uncut adapter's top-1 answers "
                "kept) or kl (mean KL(uncut ‖ pruned) per position). Default: score when a labelled evaluation is "
                "given, else agreement (kl for a regression head)"})
    score: str | None = field(default=None, metadata={
        "metavar": "|".join(SCORES),
        "help": "how components are ranked: magnitude (the paper's ‖B[:,i]‖₁·‖A[i,:]‖₁), elementwise (the authors' "
                "code), random, sensitivity (tracked in training), or one that rewrites each update in another basis "
                "and keeps its leading directions: svd (the best rank-k approximation of ΔW) or activation (of ΔW·X "
                "on calibration inputs). Default: magnitude where retraining follows the cut, svd where none does "
                "(a saved adapter, a tolerance search, a cut at the end of training)"})
    scope: str | None = field(default=None, metadata={
        "metavar": "|".join(SCOPES),
        "help": "module: every module by the same rule (the paper); global: one ranking over all modules (a "
                "tolerance search is always global). Default: module"})
    min_rank: int = field(default=1, metadata={"help": "no module keeps fewer components"})
    max_rank: int | None = field(default=None, metadata={
        "help": "no module keeps more (a serving engine's --max-lora-rank); the budget it frees goes to the next "
                "components"})
    rank_multiple: int = field(default=1, metadata={
        "help": "every kept rank is a multiple of this (or the module's whole rank)"})
    alpha: str | float = field(default="keep_scaling", metadata={
        "metavar": "keep_scaling|fold|X",
        "help": "keep_scaling keeps each module's alpha/r, so the output changes by exactly the removed components; "
                "fold multiplies each module's scaling into its B and sets alpha to its rank (scaling 1, which every "
                "serving engine applies alike); a number is the new lora_alpha of every module (the paper's)"})
    rewind: str = field(default="none", metadata={
        "metavar": "|".join(REWINDS),
        "help": "none keeps the trained values (the paper); init resets the survivors to their injection-time "
                "values (lottery-ticket rewinding)"})
    seed: int | None = field(default=None, metadata={"help": "seed of the random score"})
    svd_split: str = field(default="balanced", metadata={
        "metavar": "|".join(SVD_SPLITS),
        "help": "with the svd score, how S is shared by the new factors: balanced (√S each) or orthonormal_a "
                "(A orthonormal, B = U·S)"})
    global_norm: str = field(default="absolute", metadata={
        "metavar": "|".join(GLOBAL_NORMS),
        "help": "with a rotated score in global scope, how components are ranked across modules: by their own "
                "size (absolute) or by their share of their module's (relative)"})

    def __post_init__(self):
        if len(self.budgets()) > 1:
            self.require_budget()
        for name in ("ratio", "energy", "tolerance", "alpha"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value}")
        self._check_budget()
        self._check_choices()
        if self.scope is None:
            object.__setattr__(self, "scope", "global" if self.tolerance is not None else "module")
        if self.total_rank is not None and self.scope != "global":
            raise InputError("total_rank is a budget over all modules: use it with scope='global'")
        if self.tolerance is not None and self.scope != "global":
            raise InputError("tolerance searches one budget over all modules: use it with scope='global' (the "
                             "default)")
        if self.score is not None:
            self._check_score()

    def _check_budget(self) -> None:
        for name in ("min_rank", "rank_multiple"):
            if not _positive_int(getattr(self, name)):
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_rank is not None and (not _positive_int(self.max_rank) or self.max_rank < self.min_rank):
            raise InputError(f"max_rank must be an integer >= min_rank ({self.min_rank}), got {self.max_rank!r}")
        for name in ("min_rank", "max_rank"):
            value = getattr(self, name)
            if (value is not None and self.rank_multiple > 1 and value % self.rank_multiple
                    and not (name == "min_rank" and value == 1)):
                raise InputError(f"{name} ({value}) must be a multiple of rank_multiple ({self.rank_multiple})")
        if self.ratio is not None and (not _number(self.ratio) or not 0 <= self.ratio < 1):
            raise InputError(f"ratio must be in [0, 1), got {self.ratio!r}")
        if self.energy is not None and (not _number(self.energy) or not 0 < self.energy <= 1):
            raise InputError(f"energy must be in (0, 1], got {self.energy!r}")
        if self.tolerance is not None and (not _number(self.tolerance) or self.tolerance < 0):
            raise InputError(f"tolerance must be a number >= 0, got {self.tolerance!r}")
        if self.tolerance is not None and self.tolerance_metric == "agreement" and self.tolerance > 100:
            raise InputError(f"tolerance with tolerance_metric agreement is a percentage, at most 100, got "
                             f"{self.tolerance!r}")
        if self.tolerance_metric is not None and self.tolerance is None:
            raise InputError("tolerance_metric says what a tolerance search holds candidates to: give tolerance too")
        if self.target_rank is not None and (not _positive_int(self.target_rank) or self.target_rank < self.min_rank):
            raise InputError(f"target_rank must be an integer >= min_rank ({self.min_rank}), got {self.target_rank!r}")
        if self.total_rank is not None and not _positive_int(self.total_rank):
            raise InputError(f"total_rank must be a positive integer, got {self.total_rank!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {self.seed!r}")

    def _check_choices(self) -> None:
        for name, choices in (("score", SCORES), ("scope", SCOPES), ("rewind", REWINDS), ("svd_split", SVD_SPLITS),
                              ("global_norm", GLOBAL_NORMS), ("tolerance_metric", TOLERANCE_METRICS)):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        if self.alpha not in ALPHA_MODES and (not _number(self.alpha) or self.alpha <= 0):
            raise InputError(f"alpha must be 'keep_scaling', 'fold' or a positive number, got {self.alpha!r}")

    def _check_score(self) -> None:
        if self.energy is not None and self.score not in ROTATED_SCORES:
            raise InputError(f"energy needs a score whose components carry an energy: {' or '.join(ROTATED_SCORES)}, "
                             f"not {self.score!r}")
        if self.score in ROTATED_SCORES and self.rewind == "init":
            raise InputError(f"rewind='init' cannot follow score={self.score!r}: the kept rotated directions have no "
                             "initial values")

    @classmethod
    def help(cls, name: str) -> str:
        """The field's documentation: the one text every flag and page shows for it."""
        return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)

    def budgets(self) -> list[str]:
        return [name for name in BUDGETS if getattr(self, name) is not None]

    def require_budget(self) -> None:
        given = self.budgets()
        if len(given) != 1:
            raise InputError("pass exactly one of target_rank (ranks kept per module), ratio (fraction pruned), "
                             "total_rank (components kept in all), energy (share of the squared scores kept) or "
                             f"tolerance (the smallest within it); got {', '.join(given) or 'none'}")

    def for_cut(self, retrained: bool) -> PruneOptions:
        """The options with the default score filled in: magnitude (the paper's) where retraining follows the cut,
        svd where none does (the method study: a cut left as it is loses least in the singular basis)."""
        if self.score is not None:
            return self
        return dataclasses.replace(self, score="magnitude" if retrained else "svd")

    def with_default_budget(self, target_rank: int) -> PruneOptions:
        """`target_rank` components per module when no budget is given."""
        return self if self.budgets() else dataclasses.replace(self, target_rank=target_rank)

    def at_rank(self, rank: int) -> PruneOptions:
        """The same prune with `rank` components per module (a step of a prune schedule)."""
        return dataclasses.replace(self, target_rank=rank, ratio=None, energy=None)

    def at_total(self, components: int) -> PruneOptions:
        """The same prune with one budget of `components` over all modules (a candidate of a search)."""
        return dataclasses.replace(self, target_rank=None, ratio=None, energy=None, tolerance=None,
                                   tolerance_metric=None, total_rank=components, scope="global")

    def at_energy(self, energy: float) -> PruneOptions:
        """The same prune keeping the share `energy` of the squared amplitudes."""
        return dataclasses.replace(self, target_rank=None, ratio=None, total_rank=None, tolerance=None,
                                   tolerance_metric=None, energy=energy)

    def search_metric(self, labelled: bool) -> str | None:
        """What a tolerance search holds candidates to, given whether a labelled evaluation is at hand: the metric
        asked for, else score with labels; None: label-free, agreement or kl as the model's head allows."""
        return self.tolerance_metric or ("score" if labelled else None)

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

    def describe(self) -> str:
        """The budget and how it ranks, in words (model cards, logs)."""
        budget = ", ".join(f"{name} {getattr(self, name):g}" for name in self.budgets()) or "no budget"
        limits = [f"{name} {getattr(self, name)}" for name in ("min_rank", "max_rank", "rank_multiple")
                  if getattr(self, name) not in (None, 1)]
        return f"{budget}, {self.score} score, {self.scope} scope" + "".join(f", {limit}" for limit in limits)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve(options: PruneOptions | None, keywords: dict, retrained: bool) -> PruneOptions:
    """`options` with keyword options (the keyword form every prune function takes) set on it, and the default
    score chosen by whether retraining follows the cut."""
    options = PruneOptions(**keywords) if options is None else PruneOptions(**{**options.to_dict(), **keywords})
    return options.for_cut(retrained)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_alpha(text: str, flag: str = "--alpha") -> str | float:
    """keep_scaling, fold or a number, as a command line gives it (integers stay integers, as peft writes them)."""
    if text in ALPHA_MODES:
        return text
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{flag} must be keep_scaling, fold or a positive number, got {text!r}") from None
    return int(value) if value.is_integer() else value


def add_prune_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), scores=SCORES) -> None:
    """A flag per PruneOptions field (`--target_rank`, `--score`, ...), with the field's help; the budgets are
    mutually exclusive, `scores` the ones this command offers. Read them back with `options_from_arguments`."""
    budgets = parser.add_mutually_exclusive_group()
    for option in dataclasses.fields(PruneOptions):
        if option.name in skip:
            continue
        kind = {"int": int, "float": float}.get(str(option.type).split(" ")[0])
        target = budgets if option.name in BUDGETS else parser
        metavar = "|".join(scores) if option.name == "score" else option.metadata.get("metavar")
        target.add_argument(f"--{option.name}", type=kind, default=option.default, help=option.metadata["help"],
                            metavar=metavar)


def options_from_arguments(args: argparse.Namespace) -> PruneOptions:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PruneOptions) if hasattr(args, f.name)}
    return PruneOptions(**{**values, "alpha": parse_alpha(str(values["alpha"]))})
