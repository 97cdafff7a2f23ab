"""How small can a saved LoRA adapter be? The singular spectrum of every module's update, from the files alone.

    lorpa inspect ADAPTER_DIR [--json] [--plot spectra.png]      (or python -m lorpa.inspect)

No base model and no GPU: one module's tensors at a time, and neither transformers nor peft is imported. Per
module: its rank, the singular values of its scaled update s·B·A, the share of Σσ² the top k keep (k = 1, 2, 4, 8,
...) and the rank each energy threshold would keep. Totals: parameters and file size at each rank in module scope
and at each average rank of one global budget ranked by singular value (what `lorpa.prune` with score="svd"
keeps), and the total rank each energy threshold keeps in either scope.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

from .cli import add_adapter_arguments, check_output_file, raise_input_error, run_cli

THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... up to `limit`, and `limit` itself."""
    ranks = [2**i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else []
    return ranks + ([limit] if limit not in ranks else [])


def inspect_adapter(adapter_dir: str | Path) -> dict:
    """Everything `lorpa inspect` shows, as one JSON-ready dict. A module whose tensors hold NaN or infinite values
    is a finding (`damaged`), left out of the totals."""
    from .adapter_files import AdapterFolder
    from .budgets import energy_kept, energy_rank
    from .lowrank import singular_values
    from .plan import check_finite, scaling

    adapter = AdapterFolder(adapter_dir)
    weights, modules = adapter.weights, adapter.modules
    lora_keys = {key for m in modules.values() for key in (m.key_A, m.key_B)}
    other_bytes = sum(weights.size(k) for k in weights.keys if k not in lora_keys)
    rows, sigmas, damaged = {}, {}, {}
    for name, module in modules.items():
        row = {"rank": module.rank, "in_features": module.in_features, "out_features": module.out_features,
               "dtype": str(weights.dtypes[module.key_A]).removeprefix("torch.")}
        lora_A, lora_B = adapter.factors(name)
        problem = check_finite(name, lora_A, lora_B)
        if problem is not None:
            damaged[name] = problem
            rows[name] = {**row, "damaged": problem}
            continue
        sigma = abs(scaling(module.alpha, module.rank, adapter.use_rslora)) * singular_values(lora_A, lora_B)
        energy = sigma.double().square()
        sigmas[name] = sigma
        rows[name] = {
            **row,
            "singular_values": sigma.tolist(),
            "energy_kept": {str(k): energy_kept(energy, k) for k in powers_of_two(module.rank)},
            "rank_for_energy": {str(e): energy_rank(energy, e) for e in THRESHOLDS},
        }
    sound = {name: m for name, m in modules.items() if name in sigmas}
    return {"adapter": str(adapter.folder), "modules": rows, "damaged": damaged,
            "totals": totals(sound, sigmas, weights, other_bytes) if sound else None}


def _size(modules, weights, ranks: dict[str, int], other_bytes: int) -> tuple[int, int]:
    """(adapter parameters, bytes of tensor data) at these ranks."""
    params = sum(ranks[n] * (m.in_features + m.out_features) for n, m in modules.items())
    data = sum(ranks[n] * weights.size(m.key_A) // m.rank + ranks[n] * weights.size(m.key_B) // m.rank
               for n, m in modules.items())
    return params, data + other_bytes


def totals(modules, sigmas: dict, weights, other_bytes: int) -> dict:
    """Parameters, file size and the energy kept over all modules, at each budget."""
    import torch

    from .budgets import choose, energy_rank
    from .options import PruneOptions

    total_energy = sum(float(s.double().square().sum()) for s in sigmas.values())

    def entry(ranks: dict[str, int]) -> dict:
        kept = sum(float(torch.sort(sigmas[n].double().square(), descending=True).values[: ranks[n]].sum())
                   for n in ranks)
        params, size = _size(modules, weights, ranks, other_bytes)
        return {"total_rank": sum(ranks.values()), "parameters": params, "file_bytes": size,
                "energy_kept": 1.0 if total_energy == 0 else kept / total_energy, "max_rank": max(ranks.values())}

    largest = max(m.rank for m in modules.values())
    module_scope = {str(k): entry({n: min(k, m.rank) for n, m in modules.items()}) for k in powers_of_two(largest)}
    components = sum(m.rank for m in modules.values())
    global_scope = {}
    for k in powers_of_two(largest):
        kept = choose(sigmas, PruneOptions(score="svd").at_total(min(k * len(modules), components)))
        global_scope[str(k)] = entry({n: len(i) for n, i in kept.items()})
    energy_module = {str(e): entry({n: energy_rank(s.double().square(), e) for n, s in sigmas.items()})
                     for e in THRESHOLDS}
    energy_global = {str(e): entry({n: len(i) for n, i in choose(sigmas, PruneOptions(score="svd", scope="global")
                                                                 .at_energy(e)).items()}) for e in THRESHOLDS}
    full = entry({n: m.rank for n, m in modules.items()})
    return {"unpruned": full, "module_rank": module_scope, "global_average_rank": global_scope,
            "module_energy": energy_module, "global_energy": energy_global}


def _human(count: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}{unit}"
    return f"{count:.0f}{unit}"


def text_report(result: dict) -> str:
    """The terminal view: one line per module, then the totals at each budget."""
    shown = ["1", "2", "4", "8", "16", "32", "64"]
    lines = [f"adapter {result['adapter']}: {len(result['modules'])} LoRA modules", "",
             "module | rank | σ1 | energy kept at rank " + " / ".join(shown) + " | rank for energy "
             + " / ".join(map(str, THRESHOLDS))]
    for name, row in result["modules"].items():
        if "damaged" in row:
            lines.append(f"{name} | {row['rank']} | DAMAGED: {row['damaged']}")
            continue
        kept = " / ".join(f"{row['energy_kept'][k]:.2f}" if k in row["energy_kept"] else "-" for k in shown)
        ranks = " / ".join(str(row["rank_for_energy"][str(e)]) for e in THRESHOLDS)
        sigma = row["singular_values"][0] if row["singular_values"] else 0.0
        lines.append(f"{name} | {row['rank']} | {sigma:.3g} | {kept} | {ranks}")
    if result["damaged"]:
        lines += ["", f"{len(result['damaged'])} of {len(result['modules'])} modules hold NaN or infinite values: the "
                      "adapter is damaged (a diverged training run?); the totals leave them out"]
    t = result["totals"]
    if t is None:
        return "\n".join(lines) + "\n"
    full = t["unpruned"]
    lines += ["", f"unpruned: total rank {full['total_rank']}, {_human(full['parameters'])} parameters, "
                  f"{_human(full['file_bytes'], 'B')} of tensors", "",
              "budget | total rank | largest rank | parameters | file | energy kept"]
    for label, key in (("rank {} per module", "module_rank"), ("average rank {} (global)", "global_average_rank"),
                       ("energy {} per module", "module_energy"), ("energy {} (global)", "global_energy")):
        for value, entry in t[key].items():
            lines.append(f"{label.format(value)} | {entry['total_rank']} | {entry['max_rank']} | "
                         f"{_human(entry['parameters'])} | "
                         f"{_human(entry['file_bytes'], 'B')} | {entry['energy_kept']:.3f}")
    return "\n".join(lines) + "\n"


def plot_spectra(result: dict, out_path) -> Path:
    """Each module's normalised singular values (σ_i / σ_1) and the energy its top k keep."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    for row in result["modules"].values():
        sigma = row.get("singular_values")
        if not sigma or sigma[0] <= 0:
            continue
        ranks = range(1, len(sigma) + 1)
        left.plot(ranks, [s / sigma[0] for s in sigma], linewidth=0.6, alpha=0.5)
        cumulative = list(itertools.accumulate(s * s for s in sigma))
        right.plot(ranks, [c / cumulative[-1] for c in cumulative], linewidth=0.6, alpha=0.5)
    left.set(xscale="log", yscale="log", xlabel="component k", ylabel="σ_k / σ_1",
             title="singular values, one line per module")
    right.set(xscale="log", xlabel="rank k kept", ylabel="share of Σσ² kept", title="energy kept")
    for threshold in (0.9, 0.95, 0.99):
        right.axhline(threshold, linestyle="--", linewidth=0.8, color="gray")
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110, format="png")
    return out_path


def build_parser(prog: str = "python -m lorpa.inspect") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.error = raise_input_error
    add_adapter_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document on stdout, and nothing else there")
    parser.add_argument("--plot", metavar="PNG", default=None, help="also draw the spectra into this PNG file")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m lorpa.inspect") -> int:
    """Exit status 0, or 1 when a module holds NaN or infinite values."""
    from .hub import resolve_adapter

    args = build_parser(prog).parse_args(argv)
    if args.plot is not None:
        check_output_file(args.plot, "--plot")
    result = inspect_adapter(resolve_adapter(args.adapter_dir, args.revision, args.subfolder).folder)
    if args.plot is not None:
        plot_spectra(result, args.plot)
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text_report(result) + (f"\nspectra: {args.plot}\n" if args.plot else ""))
    return 1 if result["damaged"] else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
