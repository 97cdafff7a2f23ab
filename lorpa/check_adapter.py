"""Will every engine load and scale this adapter as peft does, and what must it be told?

    lorpa check ADAPTER            (a folder or a Hub repo id; or python -m lorpa.check_adapter)

peft builds each module from `rank_pattern` / `alpha_pattern` and scales it by alpha / r (alpha / √r with
rsLoRA). Serving engines (vLLM, TGI, SGLang) read the config's top-level `r` and `lora_alpha`, take each module's
rank from its tensors, size their buffers from a maximum rank (vLLM: `--max-lora-rank`, one of a fixed set of
values, at least `r`) and apply one scaling, lora_alpha / r, to every module; vLLM also refuses DoRA and
`modules_to_save`. Reading only the config and the tensor shapes (no tensor data), this says per module whether
the shapes agree with the config and whether such an engine would scale it differently from peft, then per
engine whether it loads the adapter as peft does and what to pass; exit 1 on any mismatch, 0 when every module is
served alike. An adapter pruned with alpha="fold" has scaling 1 everywhere and passes.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .cli import add_adapter_arguments, raise_input_error, run_cli
from .engines import vllm_max_lora_rank
from .errors import InputError


@dataclass
class ModuleCheck:
    name: str
    rank: int  # from the tensors
    configured_rank: int
    peft_scaling: float
    engine_scaling: float
    problems: list[str]
    breaks_peft: bool = False  # peft itself cannot build the module from this config (tensors and config disagree)

    @property
    def mis_scaled(self) -> bool:
        return not math.isclose(self.peft_scaling, self.engine_scaling, rel_tol=1e-6)


@dataclass
class EngineVerdict:
    engine: str
    loads: bool  # it loads the adapter
    as_peft: bool  # and scales every module as peft does
    setting: str  # what to pass it ("" when nothing)
    why: str  # what stops it, or ""


def _scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def check_adapter(adapter_dir: str | Path) -> tuple[list[ModuleCheck], dict]:
    """(per-module checks, the config's top-level r / lora_alpha / use_rslora, the largest module rank, the vLLM
    --max-lora-rank that holds every module, and per engine an `EngineVerdict`). Reads the config and the tensor
    shapes, never tensor data."""
    from .adapter_files import (
        BIN_FILE,
        CONFIG_FILE,
        SAFETENSORS_FILE,
        WeightsFile,
        factor_keys,
        find_config,
        pattern_key,
        read_config,
    )

    folder = Path(adapter_dir)  # its top-level adapter (a run's output folder holds the adapters of its stages too)
    config = read_config(folder / CONFIG_FILE if (folder / CONFIG_FILE).is_file() else find_config(folder))
    weights_path = next((folder / n for n in (SAFETENSORS_FILE, BIN_FILE) if (folder / n).is_file()), None)
    if weights_path is None:
        raise InputError(f"no {SAFETENSORS_FILE} or {BIN_FILE} in {folder}")
    weights = WeightsFile(weights_path)
    rank_pattern, alpha_pattern = config["rank_pattern"], config["alpha_pattern"]
    top_rank, top_alpha, rslora = config["r"], config["lora_alpha"], config["use_rslora"]
    keys = factor_keys(weights.keys)
    if not keys:
        raise InputError(f"{weights_path} holds no LoRA tensors (no *.lora_A.weight / *.lora_B.weight keys)")
    engine = _scaling(top_alpha, top_rank, rslora)
    checks = []
    for name, factors in keys.items():
        problems = []
        if set(factors) != {"A", "B"}:
            problems.append(f"no lora_{'B' if 'A' in factors else 'A'}.weight")
            checks.append(ModuleCheck(name, 0, 0, math.nan, engine, problems, breaks_peft=True))
            continue
        shape_A, shape_B = weights.shapes[factors["A"]], weights.shapes[factors["B"]]
        rank = shape_A[0]
        if len(shape_A) != 2 or len(shape_B) != 2 or shape_B[1] != rank:
            problems.append(f"lora_A {list(shape_A)} and lora_B {list(shape_B)} disagree on the rank")
        rank_key, alpha_key = pattern_key(rank_pattern, name), pattern_key(alpha_pattern, name)
        configured = top_rank if rank_key is None else rank_pattern[rank_key]
        alpha = top_alpha if alpha_key is None else alpha_pattern[alpha_key]
        if configured != rank:
            problems.append(f"the tensors have rank {rank}, the config gives {configured}")
        breaks_peft = bool(problems)
        if rank > top_rank:
            problems.append(f"rank {rank} above the config's r = {top_rank}, which engines size their buffers from")
        check = ModuleCheck(name, rank, configured, _scaling(alpha, configured, rslora), engine, problems, breaks_peft)
        if check.mis_scaled:
            problems.append(f"scaled {engine:g} by an engine that ignores alpha_pattern, {check.peft_scaling:g} by "
                            "peft")
        checks.append(check)
    largest = max(check.rank for check in checks)
    vllm = vllm_max_lora_rank(max(largest, top_rank))
    summary = {"r": top_rank, "lora_alpha": top_alpha, "use_rslora": rslora, "largest_rank": largest,
               "vllm_max_lora_rank": vllm}
    return checks, {**summary, "engines": engine_verdicts(checks, summary, config)}


def engine_verdicts(checks: list[ModuleCheck], summary: dict, config: dict) -> list[EngineVerdict]:
    """Whether peft, vLLM and the engines that scale alike (TGI, SGLang) load the adapter as peft does."""
    broken = any(check.breaks_peft for check in checks)
    as_peft = not any(check.mis_scaled for check in checks)
    unscaled = "" if as_peft else "one lora_alpha / r for every module, not alpha_pattern"
    vllm_refuses = [why for why, refused in (("DoRA", config.get("use_dora")),
                                            ("modules_to_save", config.get("modules_to_save")),
                                            (f"rank {summary['largest_rank']} above 512", summary["vllm_max_lora_rank"]
                                             is None)) if refused]
    shapes = "the tensors' shapes disagree with the config" if broken else ""
    vllm_rank = summary["vllm_max_lora_rank"]
    return [
        EngineVerdict("peft", not broken, True, "", shapes),
        EngineVerdict("vLLM", not broken and not vllm_refuses, as_peft,
                      f"--max-lora-rank {vllm_rank}" if vllm_rank else "",
                      shapes or (f"refuses {', '.join(vllm_refuses)}" if vllm_refuses else unscaled)),
        EngineVerdict("TGI, SGLang", not broken, as_peft, "", shapes or unscaled),
    ]


def build_parser(prog: str = "python -m lorpa.check_adapter") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.error = raise_input_error
    add_adapter_arguments(parser)
    return parser


def describe_engines(summary: dict) -> list[str]:
    lines = []
    for verdict in summary["engines"]:
        loads = "loads it" if verdict.loads else "does not load it"
        scales = "as peft does" if verdict.as_peft else "scaled differently from peft"
        setting = f"; pass {verdict.setting}" if verdict.setting and verdict.loads else ""
        why = f" ({verdict.why})" if verdict.why else ""
        lines.append(f"{verdict.engine}: {loads}, {scales}{setting}{why}")
    return lines


def main(argv: list[str] | None = None, prog: str = "python -m lorpa.check_adapter") -> int:
    from .hub import resolve_adapter

    args = build_parser(prog).parse_args(argv)
    checks, summary = check_adapter(resolve_adapter(args.adapter_dir, args.revision, args.subfolder).folder)
    for check in checks:
        verdict = "ok" if not check.problems else "MISMATCH: " + "; ".join(check.problems)
        print(f"{check.name}: rank {check.rank}, scaling {check.peft_scaling:g} in peft, {check.engine_scaling:g} "
              f"in an engine: {verdict}")
    bad = [check for check in checks if check.problems]
    print(f"config: r = {summary['r']}, lora_alpha = {summary['lora_alpha']:g}, use_rslora = {summary['use_rslora']}; "
          f"largest module rank {summary['largest_rank']}; vLLM needs --max-lora-rank "
          f"{summary['vllm_max_lora_rank'] or 'above 512 (not supported)'}")
    for line in describe_engines(summary):
        print(line)
    if bad:
        print(f"{len(bad)} of {len(checks)} modules would be served differently from peft: merge the adapter into "
              "the base weights (run_*.py --merge_final, or peft's merge_and_unload), or prune it again with the "
              "scaling folded into B (lorpa prune IN OUT ... --alpha fold)")
        return 1
    print(f"all {len(checks)} modules are served as peft serves them")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
