"""The model card (README.md) of a pruned adapter: what it is, where it came from, what the cut did, and how each
serving engine takes it. Written anew with every output; the source adapter's card is linked, never copied, so a
rank-64 card never ends up describing a rank-8 adapter."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from .adapter_files import CARD_FILE, AdapterFolder, json_text
from .budgets import parameters
from .options import ROTATED_SCORES, PruneOptions
from .plan import PrunePlan, PruneReport
from .stages import PRUNE_REPORT_FILE


def front_matter(config: dict) -> str:
    """peft's card fields: the base model, the library, and the tags that put the adapter in the base model's
    adapter tree on the Hub."""
    base = config.get("base_model_name_or_path")
    tags = ["lora", "lorpa"] + ([f"base_model:adapter:{base}"] if base else [])
    lines = ["---"] + ([f"base_model: {base}"] if base else []) + ["library_name: peft", "tags:"]
    return "\n".join(lines + [f"- {tag}" for tag in tags] + ["---"])


def module_kind(name: str) -> str:
    """A module's name without its layer index: `model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`."""
    return re.split(r"\.\d+\.", name)[-1]


def rank_table(report: PruneReport) -> list[str]:
    """Ranks kept, compactly: per rank, how many modules keep it and of which kinds."""
    kinds: dict[int, Counter] = defaultdict(Counter)
    for name, module in report.modules.items():
        kinds[module.new_rank][module_kind(name)] += 1
    lines = ["| rank | modules | which |", "|---:|---:|---|"]
    for rank in sorted(kinds, reverse=True):
        which = ", ".join(f"{kind} ×{count}" for kind, count in sorted(kinds[rank].items()))
        lines.append(f"| {rank} | {sum(kinds[rank].values())} | {which} |")
    return lines


def human(count: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return f"{count:g}"


def cut_from(source: str, url: str | None = None) -> str:
    """How a file prune's card says where the adapter came from: `source` as the user gave it (a folder, or a repo
    id and commit), `url` its Hub page."""
    linked = f"[{source}]({url})" if url else f"`{source}`"
    return f"cut from {linked} by LoRPA (`lorpa prune`), without retraining"


def model_card(report: PruneReport, config: dict, options: PruneOptions, shapes: dict[str, tuple[int, int]],
               engines: list, origin: str) -> str:
    """The card of a pruned adapter. `shapes`: (in, out) per module; `engines`: `check_adapter`'s verdicts;
    `origin`: how it came about, after "This adapter was" (e.g. `cut_from(...)`)."""
    old = {name: m.old_rank for name, m in report.modules.items()}
    new = report.ranks
    size = {"old": parameters(shapes, old), "new": parameters(shapes, new)}
    errors = [m.relative_error for m in report.modules.values()]
    lines = [front_matter(config), "", "# A LoRA adapter pruned with LoRPA", "",
             f"This adapter was {origin}: {options.describe()}. The source's own card, if it had one, describes the "
             "source, not this adapter.", "",
             "| | before | after |", "|---|---:|---:|",
             f"| total rank | {sum(old.values())} | {sum(new.values())} |",
             f"| largest module rank | {max(old.values())} | {max(new.values())} |",
             f"| adapter parameters | {human(size['old'])} | {human(size['new'])} |", "",
             "What the cut left out of each module's update ΔW, ‖ΔW − ΔW′‖_F / ‖ΔW‖_F: mean "
             f"{sum(errors) / len(errors):.4f}, largest {max(errors):.4f}."]
    if report.score in ROTATED_SCORES and options.alpha in ("keep_scaling", "fold"):
        kept = sum(1 - e * e for e in errors) / len(errors)
        lines.append(f"Share of ‖ΔW‖² kept (the kept directions are orthogonal, so it is 1 − error²): mean "
                     f"{kept:.4f}.")
    lines.append("Each module's scaling is folded into its B (alpha = rank, scaling 1)." if report.folded else
                 "Each module keeps its own alpha / r (alpha_pattern).")
    if report.fidelity is not None:
        measured = report.fidelity
        agreement = "" if measured["agreement"] is None else f"{measured['agreement']:.2f}% of top-1 answers kept, "
        lines.append(f"Against the source on {measured['positions']} compared positions of unlabelled rows: "
                     f"{agreement}mean KL(source ‖ this) {measured['kl_mean']:.3g} (p90 {measured['kl_p90']:.3g}, "
                     f"p99 {measured['kl_p99']:.3g}).")
    lines += ["", "## Ranks kept", "", *rank_table(report), "", "Per module: `prune_report.json`.", "",
              "## Serving", "", "| engine | loads it | scales it as peft | pass |", "|---|---|---|---|"]
    for verdict in engines:
        if verdict.loads:
            scales = "yes" if verdict.as_peft else f"no ({verdict.why})"
            lines.append(f"| {verdict.engine} | yes | {scales} | {verdict.setting or '-'} |")
        else:
            lines.append(f"| {verdict.engine} | no ({verdict.why}) | - | - |")
    lines += ["", "It is a standard peft adapter (per-module ranks in `rank_pattern`): "
              "`PeftModel.from_pretrained(base_model, this_folder_or_repo)` loads it with no LoRPA code."]
    return "\n".join(lines) + "\n"


def model_card_of(adapter: AdapterFolder, plan: PrunePlan, config: dict, source,
                  compare=None) -> Callable[[Path], dict[str, str]]:
    """What `write_pruned_adapter` writes beside the tensors: a model card of the staged adapter, with what
    `lorpa check` finds on it (`source`: a `lorpa.hub.AdapterSource`); with `compare` (a
    `lorpa.fidelity.AdapterComparison`), its fidelity to the source, in the card and the report too."""

    def describe(staged: Path) -> dict[str, str]:
        from .check_adapter import check_adapter

        if compare is not None:
            plan.report.fidelity = compare.measure(staged).to_dict()
        shapes = {name: (m.in_features, m.out_features) for name, m in adapter.modules.items()}
        engines = check_adapter(staged)[1]["engines"]
        origin = cut_from(source.describe(), source.url)
        return {CARD_FILE: model_card(plan.report, config, plan.options, shapes, engines, origin),
                PRUNE_REPORT_FILE: json_text(plan.report.to_dict())}

    return describe
