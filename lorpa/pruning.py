"""Rank pruning of peft LoRA adapters.

`prune` removes the lowest-scoring rank components in place and rewrites the adapter config
(`rank_pattern` / `alpha_pattern` with full module names) so that `save_pretrained` writes a
standard peft adapter that `PeftModel.from_pretrained` loads with no LoRPA code.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn

from .budgets import Budget, choose
from .calibration import clear_calibration, layer_calibration
from .layers import factors, lora_layers, resolve_adapter, unwrap
from .lowrank import SVD_SPLITS, kept_error, output_error, relative_error, weight_gram
from .rewind import SNAPSHOT_ATTR, init_snapshot
from .scoring import GLOBAL_NORMS, ROTATED_SCORES, SCORES, Rotation, rank_scores, rotate
from .sensitivity import SENSITIVITY_ATTR, tracked_sensitivity

SCOPES = ("module", "global")
REWINDS = ("none", "init")
ALPHAS = ("keep_scaling", "fold")  # or a number


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
    def read(cls, path) -> "PruneReport":
        """A report saved as JSON (prune_report.json); fields a newer report adds keep their defaults."""
        values = json.loads(Path(path).read_text())
        modules = {name: ModulePruning(**module) for name, module in values.pop("modules").items()}
        return cls(**values, modules=modules)


def _agree_across_processes(kept: dict[str, torch.Tensor], ranks: dict[str, int], device: torch.device):
    """Make every process use rank 0's choice, so replicas can never drift apart."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return kept
    masks = []
    for name, idx in kept.items():
        mask = torch.zeros(ranks[name], dtype=torch.uint8)
        mask[idx] = 1
        masks.append(mask)
    flat = torch.cat(masks).to(device)
    dist.broadcast(flat, src=0)
    flat = flat.cpu().bool()
    agreed, start = {}, 0
    for name in kept:
        agreed[name] = torch.nonzero(flat[start : start + ranks[name]]).flatten()
        start += ranks[name]
    return agreed


def _agree_on_factors(rotated: dict[str, Rotation]) -> None:
    """Give every process rank 0's rotated factors: SVDs and eigensolvers may differ in the last bit across devices."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for rotation in rotated.values():
        dist.broadcast(rotation.lora_A, src=0)
        dist.broadcast(rotation.lora_B, src=0)


def _pruned_alpha(layer, adapter_name: str, new_rank: int, alpha) -> float:
    if alpha == "fold":
        return new_rank
    if alpha != "keep_scaling":
        return alpha
    old_alpha, old_rank = layer.lora_alpha[adapter_name], layer.r[adapter_name]
    if layer.use_rslora.get(adapter_name, False):
        new_alpha = old_alpha * math.sqrt(new_rank / old_rank)
    else:
        new_alpha = old_alpha * new_rank / old_rank
    return int(new_alpha) if float(new_alpha).is_integer() else new_alpha


def _shrink_layer(layer, adapter_name: str, kept: torch.Tensor, alpha: float, rewind: str, rotated=None,
                  fold: bool = False) -> None:
    """Keep components `kept` of the layer's A rows / B columns and recompute its scaling as peft does.

    `rotated`: (A, B) of the same update in another basis, whose components are kept instead. `fold`:
    the layer's scaling is multiplied into B and rsLoRA switched off, so that `alpha` (its rank) gives
    scaling 1 and the update is unchanged.
    """
    lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    source_A, source_B = factors(layer, adapter_name) if rotated is None else rotated
    snapshot = init_snapshot(layer, adapter_name)
    if rewind == "init":
        source_A, source_B = (t.to(device=source_A.device, dtype=source_A.dtype) for t in snapshot)
    index = kept.to(source_A.device)
    new_A = source_A.detach()[index].clone()
    new_B = source_B.detach()[:, index].clone()
    if fold:
        new_B = new_B * layer.scaling[adapter_name]
        layer.use_rslora[adapter_name] = False
    lora_A.weight = nn.Parameter(new_A, requires_grad=lora_A.weight.requires_grad)
    lora_B.weight = nn.Parameter(new_B, requires_grad=lora_B.weight.requires_grad)
    lora_A.out_features = lora_B.in_features = len(kept)
    if snapshot is not None:
        layer.__dict__[SNAPSHOT_ATTR][adapter_name] = (snapshot[0][kept].clone(), snapshot[1][:, kept].clone())
    clear_calibration(layer, adapter_name)  # its G describes the old A
    sensitivity = tracked_sensitivity(layer, adapter_name)
    if sensitivity is not None:  # rotated components have no history of their own
        averages = layer.__dict__[SENSITIVITY_ATTR]
        if rotated is None:
            averages[adapter_name] = sensitivity[kept.to(sensitivity.device)].clone()
        else:
            del averages[adapter_name]

    new_rank = len(kept)
    layer.r[adapter_name] = new_rank
    layer.lora_alpha[adapter_name] = alpha
    root = math.sqrt(new_rank) if layer.use_rslora.get(adapter_name, False) else new_rank
    layer.scaling[adapter_name] = alpha / root


def _update_config(model: nn.Module, adapter_name: str, report: PruneReport) -> None:
    """Write per-module ranks/alphas so the saved adapter rebuilds exactly these shapes and scales.

    Keys are full module names; peft matches them as regexes against name endings, so longer names
    go first and a name that happens to end another one can never capture it.
    """
    config = model.peft_config[adapter_name]
    names = sorted(report.modules, key=len, reverse=True)
    config.rank_pattern = {name: report.modules[name].new_rank for name in names}
    config.alpha_pattern = {name: report.modules[name].new_alpha for name in names}
    # peft reads the patterns, which name every module; engines that ignore them (vLLM, TGI) read the top-level
    # r as the largest rank to serve and scale every module by lora_alpha / r. So r is the largest rank, with
    # the alpha of its first module by name: independent of module order, so pruning the model and pruning its
    # saved files write the same config, and right for every module whenever all share one scaling.
    config.r = max(config.rank_pattern.values())
    config.lora_alpha = report.modules[min(n for n in names if report.modules[n].new_rank == config.r)].new_alpha
    if report.folded:
        config.use_rslora = False


def check_prune_options(*, target_rank=None, ratio=None, energy=None, total_rank=None, score, scope, min_rank=1,
                        max_rank=None, rank_multiple=1, alpha="keep_scaling", rewind="none", svd_split="balanced",
                        global_norm="absolute", scores=SCORES, where: str = "") -> Budget:
    """The checks of `prune`'s options that need no model (`prune_adapter` makes them on files too); returns the budget."""
    budget = Budget(target_rank, ratio, total_rank, energy, min_rank, max_rank, rank_multiple)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    budget.check(scope)
    if score == "activation" and score not in scores:
        raise ValueError(f"the activation score needs the model's inputs (lorpa.calibrate){where}; prune the model in "
                         f"memory, or choose one of {', '.join(scores)}")
    if score not in scores:
        raise ValueError(f"unknown score {score!r}{where}; choose one of {', '.join(scores)}")
    if energy is not None and score not in ROTATED_SCORES:
        raise ValueError(f"energy needs a score whose components carry an energy: {' or '.join(ROTATED_SCORES)}, not {score!r}")
    if rewind not in REWINDS:
        raise ValueError(f"unknown rewind {rewind!r}; choose one of {', '.join(REWINDS)}")
    if svd_split not in SVD_SPLITS:
        raise ValueError(f"unknown svd_split {svd_split!r}; choose one of {', '.join(SVD_SPLITS)}")
    if score in ROTATED_SCORES and rewind == "init":
        raise ValueError(f"rewind='init' cannot follow score={score!r}: the kept rotated directions have no initial values")
    if global_norm not in GLOBAL_NORMS:
        raise ValueError(f"unknown global_norm {global_norm!r}; choose one of {', '.join(GLOBAL_NORMS)}")
    if alpha not in ALPHAS and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ValueError(f"alpha must be 'keep_scaling', 'fold' or a positive number, got {alpha!r}")
    return budget


def check_module_shapes(shapes: dict[str, tuple[int, int, int]], *, target_rank, score, total_rank=None) -> None:
    """Per module (rank, in_features, out_features): the target fits every rank, and elementwise is defined."""
    components = sum(rank for rank, _, _ in shapes.values())
    if total_rank is not None and total_rank > components:
        raise ValueError(f"total_rank {total_rank} exceeds the adapter's {components} rank components")
    for name, (rank, in_features, out_features) in shapes.items():
        if target_rank is not None and rank < target_rank:
            raise ValueError(f"target_rank {target_rank} exceeds the rank of {name} ({rank})")
        if score == "elementwise" and in_features != out_features:
            raise ValueError(
                f"{name}: the elementwise score needs in_features == out_features, got in={in_features}, out={out_features}"
            )


def check_prune_arguments(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    total_rank: int | None = None,
    score: str = "magnitude",
    scope: str = "module",
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_multiple: int = 1,
    alpha: str | float = "keep_scaling",
    rewind: str = "none",
    seed: int | None = None,
    svd_split: str = "balanced",
    global_norm: str = "absolute",
    adapter_name: str | None = None,
    calibrated: bool = True,
):
    """Validate `prune`'s arguments against `model` without touching it (run scripts call this
    before stage 1, so a bad option fails in seconds rather than after hours of training).
    `calibrated=False` skips the check that the activation score's calibration was recorded (the run
    scripts record it right before the prune).

    Returns (unwrapped model, adapter name, LoRA layers).
    """
    model = unwrap(model)
    if not isinstance(model, PeftModel):
        raise ValueError("prune needs a peft PeftModel (from get_peft_model or PeftModel.from_pretrained)")
    adapter_name = resolve_adapter(model, adapter_name)
    if model.peft_config[adapter_name].peft_type.value != "LORA":
        raise ValueError(f"prune works on LoRA adapters, got {model.peft_config[adapter_name].peft_type.value}")
    layers = lora_layers(model, adapter_name)
    check_prune_options(target_rank=target_rank, ratio=ratio, energy=energy, total_rank=total_rank, score=score,
                        scope=scope, min_rank=min_rank, max_rank=max_rank, rank_multiple=rank_multiple, alpha=alpha,
                        rewind=rewind, svd_split=svd_split, global_norm=global_norm)
    shapes = {name: (layer.r[adapter_name], layer.in_features, layer.out_features) for name, layer in layers.items()}
    check_module_shapes(shapes, target_rank=target_rank, score=score, total_rank=total_rank)
    for name, layer in layers.items():
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"{name}: adapter {adapter_name!r} is merged into the base weights; unmerge it first")
        if rewind == "init" and init_snapshot(layer, adapter_name) is None:
            raise ValueError(
                f"{name}: rewind='init' needs the injection-time values; create the adapters with "
                "lorpa.get_peft_model or call lorpa.record_init right after get_peft_model"
            )
        calibration = layer_calibration(layer, adapter_name)
        if score == "activation" and calibrated and (calibration is None or calibration.gram.shape[0] != layer.r[adapter_name]):
            raise ValueError(f"{name}: the activation score needs a calibration of the current adapter; run "
                             "lorpa.calibrate(model, batches) on some training batches right before the prune")
    return model, adapter_name, layers


def prune(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    total_rank: int | None = None,
    score: str = "magnitude",
    scope: str = "module",
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_multiple: int = 1,
    alpha: str | float = "keep_scaling",
    rewind: str = "none",
    seed: int | None = None,
    svd_split: str = "balanced",
    global_norm: str = "absolute",
    adapter_name: str | None = None,
) -> PruneReport:
    """Drop the lowest-scoring rank components of every LoRA module, in place.

    The budget is exactly one of (`lorpa.budgets`): target_rank (ranks kept per module; the average in
        global scope), ratio (fraction of each module's rank pruned), total_rank (components kept over all
        modules, global scope) or energy (the share of the squared scores kept, for svd and activation: per
        module in module scope, as peft's convert_to_lora takes a float rank, one threshold over all
        modules in global scope).
    scope: "module" prunes by the same rule everywhere (the paper); "global" ranks all components of all
        modules together against the same total.
    min_rank / max_rank: no module keeps fewer / more (max_rank: a serving engine's --max-lora-rank; the
        budget it frees goes to the next components); rank_multiple: every rank is a multiple of it.
    alpha: "keep_scaling" keeps each module's alpha/r, so the output changes by exactly the removed
        components; a number sets a new lora_alpha everywhere (the paper's pruned alpha); "fold" keeps
        the update of keep_scaling but multiplies each module's scaling into its B and sets its alpha to its
        rank (rsLoRA off): scaling 1 everywhere, so engines that apply one lora_alpha / r to every module
        (vLLM, TGI, SGLang) serve it as peft does.
    rewind: "none" keeps trained values (the paper); "init" resets survivors to injection-time values.
    score: "magnitude" (the paper), "elementwise" (the authors' code), "random", "sensitivity"
        (tracked during training by `SensitivityCallback`), or one that first rewrites each adapter in
        another basis of the same update and keeps its leading directions: "svd" (the singular basis,
        so each pruned update is the best rank-k approximation of ΔW; `svd_split` says how √S is shared
        between A and B) or "activation" (the basis of ΔW·X on the inputs `lorpa.calibrate` recorded,
        so each pruned update is the best rank-k approximation of what the layer adds to its outputs).
    global_norm: with a rewriting score in global scope, "absolute" ranks every module's components by
        their own size (|s|·σ, or the per-token output energy), "relative" by their share of their module's.
    Every module's report holds the weight error, and the output error on the calibration inputs when a
    calibration was recorded (any score). The optimizer must be rebuilt afterwards: the LoRA parameters
    are new tensors.
    """
    model, adapter_name, layers = check_prune_arguments(
        model, target_rank=target_rank, ratio=ratio, energy=energy, total_rank=total_rank, score=score, scope=scope,
        min_rank=min_rank, max_rank=max_rank, rank_multiple=rank_multiple, alpha=alpha, rewind=rewind, seed=seed,
        svd_split=svd_split, global_norm=global_norm, adapter_name=adapter_name,
    )
    budget = Budget(target_rank, ratio, total_rank, energy, min_rank, max_rank, rank_multiple)
    before = {name: (*factors(layer, adapter_name), layer.scaling[adapter_name]) for name, layer in layers.items()}
    calibrations = {name: layer_calibration(layer, adapter_name) for name, layer in layers.items()}
    calibrations = {name: c for name, c in calibrations.items() if c is not None and c.gram.shape[0] == before[name][0].shape[0]}
    rotated = {}
    if score in ROTATED_SCORES:
        rotated = {name: rotate(score, a, b, s, calibrations.get(name), svd_split) for name, (a, b, s) in before.items()}
        _agree_on_factors(rotated)
        scores = {name: rotation.ranking(global_norm if scope == "global" else "absolute") for name, rotation in rotated.items()}
    else:
        scores = rank_scores(model, score, seed=seed, adapter_name=adapter_name)
    ranks = {name: layer.r[adapter_name] for name, layer in layers.items()}
    kept = choose(scores, budget, scope)
    device = factors(next(iter(layers.values())), adapter_name)[0].device
    kept = _agree_across_processes(kept, ranks, device)

    report = PruneReport(score=score, scope=scope, rewind=rewind, svd_split=svd_split if score == "svd" else None,
                         global_norm=global_norm if score in ROTATED_SCORES and scope == "global" else None,
                         folded=alpha == "fold")
    for name, layer in layers.items():
        indices = torch.sort(kept[name]).values
        new_alpha = _pruned_alpha(layer, adapter_name, len(indices), alpha)
        old_alpha = layer.lora_alpha[adapter_name]
        rotation = rotated.get(name)
        gram = rotation.weight_energy if rotation is not None else weight_gram(*before[name][:2]) if rewind == "none" else None
        _shrink_layer(layer, adapter_name, indices, new_alpha, rewind,
                      None if rotation is None else (rotation.lora_A, rotation.lora_B), fold=alpha == "fold")
        after = (*factors(layer, adapter_name), layer.scaling[adapter_name])
        if gram is None:  # rewound: the kept factors are no part of the old ones
            weight_error = relative_error(before[name], after)
        else:
            kept_scale = before[name][2] if alpha == "fold" else after[2]  # folded: the scaling went into B
            weight_error = kept_error(gram, indices, before[name][2], kept_scale)
        calibration = calibrations.get(name)
        report.modules[name] = ModulePruning(
            old_rank=ranks[name],
            new_rank=len(indices),
            old_alpha=old_alpha,
            new_alpha=new_alpha,
            kept=indices.tolist(),
            scores=scores[name].tolist(),
            relative_error=weight_error,
            output_error=None if calibration is None else output_error(before[name], after, calibration.gram),
        )
    _update_config(model, adapter_name, report)
    return report
