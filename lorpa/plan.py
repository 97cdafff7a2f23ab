"""Planning a prune: each module's factors and the options in, what to keep out.

The plan knows nothing of layers or files. `score_modules` scores every component (rewriting each update in its
singular or output basis first, for a rotated score: one SVD or eigensolve per module); `choose_kept` applies the
budget; `build_plan` cuts each module to its kept components and measures what the cut left out. Two appliers use
it: `lorpa.pruning` writes the plan into live peft layers, `lorpa.prune_adapter` into adapter files, so a model
pruned in memory and its saved adapter pruned from files cannot differ.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .budgets import choose, module_counts
from .engines import vllm_max_lora_rank
from .errors import InputError
from .lowrank import kept_error, output_error, relative_error, weight_gram
from .options import ROTATED_SCORES, PruneOptions
from .scoring import Rotation, elementwise_scores, magnitude_scores, random_scores, rotate


def scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """peft's scaling of a module's update: alpha / r, or alpha / √r with rsLoRA."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


@dataclass
class ModuleFactors:
    """One LoRA module as the plan reads it: its rank and alpha, its factors (read when the plan asks for them, so
    an adapter read from files is in memory one module at a time), and what training recorded on it."""

    read: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (A: r × in, B: out × r)
    rank: int
    alpha: float
    use_rslora: bool = False
    calibration: object | None = None  # `lorpa.calibrate`'s record: .gram (r × r) and .tokens
    sensitivity: torch.Tensor | None = None  # `SensitivityCallback`'s moving average, one value per component
    initial: tuple[torch.Tensor, torch.Tensor] | None = None  # injection-time (A, B), for rewind="init"

    @classmethod
    def of(cls, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, use_rslora: bool = False,
           **recorded) -> ModuleFactors:
        """A module whose factors are in memory."""
        return cls(lambda: (lora_A, lora_B), lora_A.shape[0], alpha, use_rslora, **recorded)

    @property
    def scaling(self) -> float:
        return scaling(self.alpha, self.rank, self.use_rslora)


@dataclass
class ModulePruning:
    """What happened to one adapted module."""

    old_rank: int
    new_rank: int
    old_alpha: float
    new_alpha: float
    kept: list[int]
    scores: list[float]
    relative_error: float  # ‖ΔW_before − ΔW_after‖_F / ‖ΔW_before‖_F, scaling included
    output_error: float | None = None  # ‖(ΔW_before − ΔW_after)·X‖_F / ‖ΔW_before·X‖_F on the calibration inputs


@dataclass
class PruneReport:
    score: str
    scope: str
    rewind: str
    svd_split: str | None = None
    global_norm: str | None = None  # how a rotated score's components are ranked across modules (global scope)
    folded: bool = False  # each module's scaling multiplied into its B, alpha = rank, no rsLoRA: scaling 1 everywhere
    modules: dict[str, ModulePruning] = field(default_factory=dict)
    fidelity: dict | None = None  # the pruned model against the uncut one on unlabelled inputs (`lorpa.fidelity`)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.new_rank for name, m in self.modules.items()}

    @property
    def old_ranks(self) -> dict[str, int]:
        return {name: m.old_rank for name, m in self.modules.items()}

    @property
    def mean_relative_error(self) -> float:
        return sum(m.relative_error for m in self.modules.values()) / len(self.modules)

    @property
    def mean_output_error(self) -> float | None:
        """None unless every module was calibrated (`lorpa.calibrate`) and its output error measurable."""
        errors = [m.output_error for m in self.modules.values()]
        return None if any(e is None for e in errors) else sum(errors) / len(errors)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PruneReport:
        """The report `to_dict` gave (prune_report.json); fields a newer report adds keep their defaults."""
        values = dict(values)
        modules = {name: ModulePruning(**module) for name, module in values.pop("modules").items()}
        return cls(**values, modules=modules)

    @classmethod
    def read(cls, path) -> PruneReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class ScoredModule:
    """A module with its components scored: what any budget needs to choose and cut."""

    factors: ModuleFactors
    scores: torch.Tensor  # float32 on the CPU, one per component, so ties do not depend on dtype or device
    rotation: Rotation | None  # the update rewritten in the rotated score's basis; its components are kept instead
    error_gram: torch.Tensor | None  # `lowrank.kept_error`'s H (None when rewinding: kept values are not the old ones)


@dataclass
class PrunePlan:
    """What a prune keeps: the report (kept components, ranks, alphas, errors), and each module's new factors, cut
    when asked for (`factors`), so that a writer holds one module's at a time."""

    report: PruneReport
    scored: dict[str, ScoredModule]
    options: PruneOptions
    cut: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # the factors cut so far

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's new (A, B): kept if the report's errors needed them, else cut now and not kept."""
        if name in self.cut:
            return self.cut[name]
        return cut(self.scored[name], torch.tensor(self.report.modules[name].kept, dtype=torch.long), self.options)


def component_scores(name: str, module: ModuleFactors, options: PruneOptions, lora_A: torch.Tensor,
                     lora_B: torch.Tensor) -> tuple[torch.Tensor, Rotation | None]:
    """One module's scores, float32 on the CPU, and its rotation for a rotated score."""
    if options.score in ROTATED_SCORES:
        rotation = rotate(options.score, lora_A, lora_B, module.scaling, module.calibration, options.svd_split)
        return rotation.ranking(options.global_norm if options.scope == "global" else "absolute"), rotation
    if options.score == "random":
        values = random_scores(lora_A.shape[0], 0 if options.seed is None else options.seed, name)
    elif options.score == "sensitivity":
        values = module.sensitivity
    elif options.score == "elementwise":
        values = elementwise_scores(lora_A.float(), lora_B.float())
    else:
        values = magnitude_scores(lora_A.float(), lora_B.float())
    return values.float().cpu(), None


def finite(tensor: torch.Tensor) -> bool:
    """No NaN and no infinity in `tensor`: one sum decides for almost every tensor (a finite sum has no NaN or inf
    in it); only when the sum is not finite (overflow, or a bad value) is every element checked."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> str | None:
    """What is wrong with a module whose factors hold NaN or infinite values (None if nothing)."""
    bad = [factor for factor, tensor in (("lora_A", lora_A), ("lora_B", lora_B)) if not finite(tensor)]
    return None if not bad else f"{name}: {' and '.join(bad)} hold NaN or infinite values"


def most_kept(name: str, scores: torch.Tensor, options: PruneOptions) -> int:
    """The most components of the module any cut under `options` can keep: the module-scope count, else its cap."""
    if options.scope == "module" and options.budgets() and options.tolerance is None:
        return module_counts({name: scores}, options)[name]
    return options.bounds(len(scores))[1]


def score_modules(modules: dict[str, ModuleFactors], options: PruneOptions,
                  trim: bool = False) -> dict[str, ScoredModule]:
    """Every module scored once, reading its factors once; any number of budgets can then be chosen and cut from
    the result. `trim`: a rotated module keeps only the leading components a cut under `options` can keep, so that
    the rotated adapter is not held whole where the scope says how many that is. A module whose factors are not
    finite (a diverged run, a damaged file) is refused by name."""
    scored = {}
    for name, module in modules.items():
        lora_A, lora_B = module.read()
        try:
            scores, rotation = component_scores(name, module, options, lora_A, lora_B)
        except RuntimeError as error:  # an SVD or eigensolver that met a NaN
            failed = error
        else:
            failed = None
        # Scores that read every element carry a NaN or inf into themselves: finite scores, finite factors.
        if failed is not None or options.score in ("random", "sensitivity") or not finite(scores):
            problem = check_finite(name, lora_A, lora_B)
            if problem is not None:
                raise InputError(f"{problem}; such an adapter cannot be pruned (retrain it, or prune an earlier "
                                 "checkpoint)")
            if failed is not None:
                raise failed
        if rotation is not None:
            gram = rotation.weight_energy
        else:
            gram = weight_gram(lora_A, lora_B) if options.rewind == "none" else None
        if rotation is not None and trim:  # its amplitudes descend: a cut keeps a prefix of its components
            kept = most_kept(name, scores, options)
            rotation = replace(rotation, lora_A=rotation.lora_A[:kept].clone(),
                               lora_B=rotation.lora_B[:, :kept].clone())
        scored[name] = ScoredModule(module, scores, rotation, gram)
    return scored


def choose_kept(scored: dict[str, ScoredModule], options: PruneOptions) -> dict[str, torch.Tensor]:
    """The components each module keeps under the options' budget (`lorpa.budgets.choose`)."""
    return choose({name: module.scores for name, module in scored.items()}, options)


def pruned_alpha(module: ModuleFactors, new_rank: int, alpha) -> float:
    """The module's lora_alpha after the cut: its rank (fold), the given number, or the alpha that keeps alpha/r."""
    if alpha == "fold":
        return new_rank
    if alpha != "keep_scaling":
        return alpha
    if module.use_rslora:
        new_alpha = module.alpha * math.sqrt(new_rank / module.rank)
    else:
        new_alpha = module.alpha * new_rank / module.rank
    return int(new_alpha) if float(new_alpha).is_integer() else new_alpha


def cut(module: ScoredModule, kept: torch.Tensor, options: PruneOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept components' factors: of the rotated update, of the injection-time values (rewind) or as stored;
    folded, B carries the module's scaling."""
    if module.rotation is not None:
        source_A, source_B = module.rotation.lora_A, module.rotation.lora_B
    elif options.rewind == "init":
        lora_A = module.factors.read()[0]
        source_A, source_B = (t.to(device=lora_A.device, dtype=lora_A.dtype) for t in module.factors.initial)
    else:
        source_A, source_B = module.factors.read()
    index = kept.to(source_A.device)
    new_A, new_B = source_A.detach()[index].clone(), source_B.detach()[:, index].clone()
    if options.alpha == "fold":
        new_B = new_B * module.factors.scaling
    return new_A, new_B


def build_plan(scored: dict[str, ScoredModule], options: PruneOptions, kept: dict[str, torch.Tensor]) -> PrunePlan:
    """Cut every module to its `kept` components and measure what each cut left out of ΔW (and of ΔW·X, where a
    calibration of the module was recorded)."""
    folded = options.alpha == "fold"
    rotated = options.score in ROTATED_SCORES
    report = PruneReport(score=options.score, scope=options.scope, rewind=options.rewind,
                         svd_split=options.svd_split if options.score == "svd" else None,
                         global_norm=options.global_norm if rotated and options.scope == "global" else None,
                         folded=folded)
    plan = PrunePlan(report, scored, options)
    for name, module in scored.items():
        before = module.factors
        indices = torch.sort(kept[name]).values
        new_alpha = pruned_alpha(before, len(indices), options.alpha)
        new_scale = scaling(new_alpha, len(indices), before.use_rslora and not folded)
        calibration = before.calibration
        if module.error_gram is None or calibration is not None:  # these errors need the new factors themselves
            plan.cut[name] = cut(module, indices, options)
        if module.error_gram is None:
            weight_error = relative_error((*before.read(), before.scaling), (*plan.cut[name], new_scale))
        else:  # folded: the scaling went into B
            kept_scale = before.scaling if folded else new_scale
            weight_error = kept_error(module.error_gram, indices, before.scaling, kept_scale)
        report.modules[name] = ModulePruning(
            old_rank=before.rank,
            new_rank=len(indices),
            old_alpha=before.alpha,
            new_alpha=new_alpha,
            kept=indices.tolist(),
            scores=module.scores.tolist(),
            relative_error=weight_error,
            output_error=None if calibration is None else output_error(
                (*before.read(), before.scaling), (*plan.cut[name], new_scale), calibration.gram),
        )
    return plan


def plan_prune(modules: dict[str, ModuleFactors], options: PruneOptions) -> PrunePlan:
    """Score, choose and cut in one step, holding one module's factors at a time (one process; `lorpa.prune` adds
    the agreement between processes)."""
    scored = score_modules(modules, options, trim=True)
    return build_plan(scored, options, choose_kept(scored, options))


def config_changes(report: PruneReport) -> dict:
    """The adapter config's fields a prune rewrites, so that peft rebuilds exactly the pruned shapes and scales.

    Keys are full module names; peft matches them as regexes against name endings, so longer names go first and
    a name that happens to end another one can never capture it. Engines that ignore the patterns (vLLM, TGI)
    read the top-level r as the largest rank to serve and scale every module by lora_alpha / r: so r is the
    largest rank, with the alpha of its first module by name, which is right for every module whenever all share
    one scaling. After a fold every module's scaling is 1, so r = lora_alpha, and r is the smallest value vLLM's
    --max-lora-rank accepts that holds the largest rank: the config's r is always the value to pass.
    """
    names = sorted(report.modules, key=len, reverse=True)
    rank_pattern = {name: report.modules[name].new_rank for name in names}
    alpha_pattern = {name: report.modules[name].new_alpha for name in names}
    r = max(rank_pattern.values())
    if report.folded:  # scaling 1 everywhere: r = lora_alpha, a --max-lora-rank vLLM accepts
        r = vllm_max_lora_rank(r) or r
        return {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "r": r, "lora_alpha": r,
                "use_rslora": False}
    alpha = report.modules[min(n for n in names if report.modules[n].new_rank == r)].new_alpha
    return {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "r": r, "lora_alpha": alpha}
