"""Rank pruning of a live peft LoRA model, in place.

`prune` reads every LoRA layer's factors (and what training recorded on it), plans the cut (`lorpa.plan`) and
writes the plan back: the smaller factors, each layer's rank, alpha and scaling, the state recorded on the layer,
and the adapter config (`rank_pattern` / `alpha_pattern` with full module names), so that `save_pretrained`
writes a standard peft adapter that `PeftModel.from_pretrained` loads with no LoRPA code. Under torch.distributed
every process applies process 0's choice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn

from . import fidelity
from .budgets import check_fits, parameters
from .calibration import CALIBRATION_ATTR, layer_calibration
from .errors import InputError
from .layers import factors, lora_layers, resolve_adapter, set_layer_state, unwrap
from .options import ROTATED_SCORES, PruneOptions, resolve
from .plan import (
    ModuleFactors,
    PrunePlan,
    PruneReport,
    ScoredModule,
    build_plan,
    choose_kept,
    component_scores,
    config_changes,
    scaling,
    score_modules,
)
from .rewind import SNAPSHOT_ATTR, init_snapshot
from .sensitivity import SENSITIVITY_ATTR, tracked_sensitivity
from .tolerance import Candidate, ToleranceSearch, search_budget


def check_prune(model: nn.Module, options: PruneOptions, adapter_name: str | None = None, calibrated: bool = True):
    """Check `options` against `model` without touching it (the stage loop calls this before stage 1, so a bad
    option fails in seconds rather than after hours of training). `calibrated=False` skips the check that the
    activation score's calibration was recorded (the loop records it right before the prune).

    Returns (unwrapped model, adapter name, LoRA layers).
    """
    model = unwrap(model)
    if not isinstance(model, PeftModel):
        raise InputError("prune needs a peft PeftModel (from get_peft_model or PeftModel.from_pretrained)")
    adapter_name = resolve_adapter(model, adapter_name)
    if model.peft_config[adapter_name].peft_type.value != "LORA":
        raise InputError(f"prune works on LoRA adapters, got {model.peft_config[adapter_name].peft_type.value}")
    layers = lora_layers(model, adapter_name)
    check_fits(options, {name: (layer.r[adapter_name], layer.in_features, layer.out_features)
                         for name, layer in layers.items()})
    check_layers(layers, adapter_name, options, calibrated)
    return model, adapter_name, layers


def check_layers(layers: dict, adapter_name: str, options: PruneOptions, calibrated: bool = True) -> None:
    """What the score needs recorded on each layer is there, and no adapter is merged."""
    for name, layer in layers.items():
        if adapter_name in layer.merged_adapters:
            raise InputError(f"{name}: adapter {adapter_name!r} is merged into the base weights; unmerge it first")
        if options.rewind == "init" and init_snapshot(layer, adapter_name) is None:
            raise InputError(f"{name}: rewind='init' needs the injection-time values; create the adapters with "
                             "lorpa.get_peft_model or call lorpa.rewind.record_init right after get_peft_model")
        calibration = layer_calibration(layer, adapter_name)
        if (options.score == "activation" and calibrated
                and (calibration is None or calibration.gram.shape[0] != layer.r[adapter_name])):
            raise InputError(f"{name}: the activation score needs a calibration of the current adapter; run "
                             "lorpa.calibrate(model, batches) on some training batches right before the prune")
        if options.score == "sensitivity" and calibrated and tracked_sensitivity(layer, adapter_name) is None:
            raise InputError(f"{name}: no sensitivity was tracked; train with lorpa.SensitivityCallback (or call "
                             "lorpa.update_sensitivity before each optimizer step) before pruning")


def live_modules(layers: dict, adapter_name: str) -> dict[str, ModuleFactors]:
    """What the plan reads of each layer: its factors and alpha, and the state training recorded on it."""
    modules = {}
    for name, layer in layers.items():
        lora_A, lora_B = factors(layer, adapter_name)
        calibration = layer_calibration(layer, adapter_name)
        if calibration is not None and calibration.gram.shape[0] != lora_A.shape[0]:
            calibration = None  # recorded before an earlier prune: it describes another A
        modules[name] = ModuleFactors.of(lora_A, lora_B, layer.lora_alpha[adapter_name],
                                         layer.use_rslora.get(adapter_name, False), calibration=calibration,
                                         sensitivity=tracked_sensitivity(layer, adapter_name),
                                         initial=init_snapshot(layer, adapter_name))
    return modules


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _agree_on_rotations(scored: dict[str, ScoredModule]) -> None:
    """Give every process process 0's rotated factors: SVDs and eigensolvers may differ in the last bit across
    devices."""
    for module in scored.values():
        if module.rotation is not None:
            dist.broadcast(module.rotation.lora_A, src=0)
            dist.broadcast(module.rotation.lora_B, src=0)


def _agree_on_kept(kept: dict[str, torch.Tensor], scored: dict[str, ScoredModule]) -> dict[str, torch.Tensor]:
    """Make every process keep process 0's components, so replicas can never drift apart."""
    masks = []
    for name, indices in kept.items():
        mask = torch.zeros(scored[name].factors.rank, dtype=torch.uint8)
        mask[indices] = 1
        masks.append(mask)
    flat = torch.cat(masks).to(next(iter(scored.values())).factors.read()[0].device)
    dist.broadcast(flat, src=0)
    flat = flat.cpu().bool()
    agreed, start = {}, 0
    for name, module in scored.items():
        agreed[name] = torch.nonzero(flat[start : start + module.factors.rank]).flatten()
        start += module.factors.rank
    return agreed


def score_live(modules: dict[str, ModuleFactors], options: PruneOptions) -> dict[str, ScoredModule]:
    scored = score_modules(modules, options)
    if _distributed():
        _agree_on_rotations(scored)
    return scored


def plan_live(scored: dict[str, ScoredModule], options: PruneOptions) -> PrunePlan:
    kept = choose_kept(scored, options)
    return build_plan(scored, options, _agree_on_kept(kept, scored) if _distributed() else kept)


def apply_plan(model: PeftModel, adapter_name: str, modules: dict[str, ModuleFactors], plan: PrunePlan) -> None:
    """Write `plan` into the live layers: the new factors as new parameters (the optimizer must be rebuilt), rank,
    alpha and scaling as peft computes them, the recorded state cut to the kept components (rotated components
    have no sensitivity history of their own; a calibration describes the old A and goes), and the config."""
    report = plan.report
    for name, layer in lora_layers(model, adapter_name).items():
        module, pruning = modules[name], report.modules[name]
        kept = torch.tensor(pruning.kept, dtype=torch.long)
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        new_A, new_B = plan.factors(name)
        lora_A.weight = nn.Parameter(new_A, requires_grad=lora_A.weight.requires_grad)
        lora_B.weight = nn.Parameter(new_B, requires_grad=lora_B.weight.requires_grad)
        lora_A.out_features = lora_B.in_features = len(kept)
        if module.initial is not None:
            set_layer_state(layer, SNAPSHOT_ATTR, adapter_name,
                            (module.initial[0][kept].clone(), module.initial[1][:, kept].clone()))
        set_layer_state(layer, CALIBRATION_ATTR, adapter_name, None)
        if module.sensitivity is not None:
            rotated = report.score in ROTATED_SCORES
            set_layer_state(layer, SENSITIVITY_ATTR, adapter_name,
                            None if rotated else module.sensitivity[kept.to(module.sensitivity.device)].clone())
        if report.folded:
            layer.use_rslora[adapter_name] = False
        layer.r[adapter_name], layer.lora_alpha[adapter_name] = pruning.new_rank, pruning.new_alpha
        rslora = layer.use_rslora.get(adapter_name, False)
        layer.scaling[adapter_name] = scaling(pruning.new_alpha, pruning.new_rank, rslora)
    config = model.peft_config[adapter_name]
    for key, value in config_changes(report).items():
        setattr(config, key, value)


def prune(model: nn.Module, options: PruneOptions | None = None, *, adapter_name: str | None = None,
          **keywords) -> PruneReport:
    """Drop the lowest-scoring rank components of every LoRA module, in place, as `options` say (`PruneOptions`;
    or give its fields as keywords: `prune(model, target_rank=8, score="svd")`).

    Every module's report holds what the cut left out of ΔW, and of ΔW·X on the calibration inputs when a
    calibration was recorded (`lorpa.calibrate`, any score). The optimizer must be rebuilt afterwards: the LoRA
    parameters are new tensors.
    """
    options = resolve(options, keywords, retrained=True)
    if options.tolerance is not None:
        raise InputError("a tolerance budget needs an evaluation of each candidate: use lorpa.prune_to_tolerance")
    options.require_budget()
    model, adapter_name, layers = check_prune(model, options, adapter_name)
    modules = live_modules(layers, adapter_name)
    plan = plan_live(score_live(modules, options), options)
    apply_plan(model, adapter_name, modules, plan)
    return plan.report


def prune_to_tolerance(model: nn.Module, evaluate: Callable[[nn.Module], float] | None = None,
                       tolerance: float | None = None, options: PruneOptions | None = None, *,
                       batches: list[dict] | None = None, adapter_name: str | None = None,
                       **keywords) -> tuple[PruneReport, ToleranceSearch]:
    """Prune `model` in place to the smallest global budget that stays close to the unpruned model
    (`lorpa.tolerance`); every candidate is recorded. `tolerance` (or `options.tolerance`) is read by
    `options.tolerance_metric`:

    score: `evaluate(model)` (higher is better, e.g. accuracy × 100 on held-out rows) within `tolerance` points;
    agreement / kl (label-free, on `batches` of unlabelled inputs): at least `tolerance` percent of the uncut
        model's top-1 answers unchanged / at most `tolerance` mean KL(uncut ‖ pruned) (`lorpa.fidelity`).
    Default: score with `evaluate`, else agreement (kl for a regression head). The components are scored once;
    each candidate is cut from the same unpruned factors.
    """
    options = resolve(options, keywords if tolerance is None else {**keywords, "tolerance": tolerance},
                      retrained=False)
    if options.tolerance is None:
        raise InputError("prune_to_tolerance needs tolerance: how close to the unpruned model a candidate must stay")
    metric = options.search_metric(evaluate is not None)
    if metric == "score" and evaluate is None:
        raise InputError("tolerance_metric score needs evaluate(model) -> score; without labels use agreement or kl")
    if metric != "score":
        if not batches:
            raise InputError("a label-free tolerance (agreement, kl) needs batches of inputs to compare answers on")
        recorded = fidelity.reference(model, batches)
        metric = fidelity.label_free_metric(metric, recorded)
        evaluate = fidelity.criterion(metric, batches, recorded)
    model, adapter_name, layers = check_prune(model, options, adapter_name)
    modules = live_modules(layers, adapter_name)
    shapes = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
    ranks = {name: module.rank for name, module in modules.items()}
    scored = score_live(modules, options)
    reference = float(evaluate(model))

    def candidate(components: int) -> Candidate:
        plan = plan_live(scored, options.at_total(components))
        apply_plan(model, adapter_name, modules, plan)
        ranks = plan.report.ranks
        return Candidate(sum(ranks.values()), parameters(shapes, ranks), float(evaluate(model)))

    search = search_budget(candidate, sum(options.bounds(r)[0] for r in ranks.values()),
                           sum(options.bounds(r)[1] for r in ranks.values()), sum(ranks.values()),
                           parameters(shapes, ranks), reference, options.tolerance, metric)
    plan = plan_live(scored, options.at_total(search.kept))
    apply_plan(model, adapter_name, modules, plan)
    return plan.report, search


def apply_prune_report(model: nn.Module, report: PruneReport, adapter_name: str | None = None) -> None:
    """Give a model the shapes, alphas and config of an earlier prune (a resumed run: the values then come from
    a checkpoint)."""
    model = unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    layers = lora_layers(model, adapter_name)
    if set(layers) != set(report.modules):
        raise InputError("the prune report names other modules than the model's LoRA layers")
    for name, layer in layers.items():
        if layer.r[adapter_name] != report.modules[name].old_rank:
            raise InputError(f"{name} has rank {layer.r[adapter_name]}; the prune report started from "
                             f"{report.modules[name].old_rank}")
    modules = live_modules(layers, adapter_name)
    plan = PrunePlan(report, {}, PruneOptions())
    for name, module in modules.items():
        kept = torch.tensor(report.modules[name].kept, dtype=torch.long)
        lora_A, lora_B = module.read()
        plan.cut[name] = (lora_A.detach()[kept].clone(), lora_B.detach()[:, kept].clone())
    apply_plan(model, adapter_name, modules, plan)


def rank_scores(model: nn.Module, score: str = "magnitude", *, seed: int | None = None,
                adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Every component's score, per module: {full module name: float32 CPU tensor of length r}, as `prune` ranks
    them (`svd` and `activation` give the amplitudes of their own basis, not of the stored components)."""
    options = PruneOptions(score=score, seed=seed)
    model = unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    layers = lora_layers(model, adapter_name)
    check_layers(layers, adapter_name, options)
    return {name: component_scores(name, module, options, *module.read())[0]
            for name, module in live_modules(layers, adapter_name).items()}
