"""Will every engine load and scale this adapter as peft does?

    python -m lorpa.check_adapter ADAPTER_DIR

peft builds each module from `rank_pattern` / `alpha_pattern` and scales it by alpha / r (alpha / √r with
rsLoRA). Serving engines (vLLM, TGI, SGLang) read the config's top-level `r` and `lora_alpha`, take each
module's rank from its tensors, size their buffers from `r` (vLLM: `--max-lora-rank` at least `r`) and
apply one scaling, lora_alpha / r, to every module. Reading only the config and the tensor shapes (no
tensor data), this says per module whether the shapes agree with the config and whether such an engine
would scale it differently from peft; exit 1 on any mismatch, 0 when every module is served alike.
An adapter pruned with alpha="fold" has scaling 1 everywhere and always passes.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .cli import raise_input_error, run_cli
from .errors import InputError

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


@dataclass
class ModuleCheck:
    name: str
    rank: int  # from the tensors
    configured_rank: int
    peft_scaling: float
    engine_scaling: float
    problems: list[str]


def _scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def check_adapter(adapter_dir: str | Path) -> tuple[list[ModuleCheck], dict]:
    """(per-module checks, the config's top-level r / lora_alpha / use_rslora and the smallest vLLM
    --max-lora-rank that holds every module). Reads the config and the tensor shapes, never tensor data."""
    from .adapter_files import (
        BIN_FILE,
        SAFETENSORS_FILE,
        WeightsFile,
        factor_keys,
        find_config,
        pattern_key,
        read_config,
    )

    folder = Path(adapter_dir)
    config = read_config(find_config(folder))
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
            checks.append(ModuleCheck(name, 0, 0, math.nan, engine, problems))
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
        if rank > top_rank:
            problems.append(f"rank {rank} above the config's r = {top_rank}, which engines size their buffers from")
        peft = _scaling(alpha, configured, rslora)
        if not math.isclose(peft, engine, rel_tol=1e-6):
            problems.append(f"scaled {engine:g} by an engine that ignores alpha_pattern, {peft:g} by peft")
        checks.append(ModuleCheck(name, rank, configured, peft, engine, problems))
    largest = max(check.rank for check in checks)
    vllm = next((value for value in VLLM_MAX_LORA_RANKS if value >= max(largest, top_rank)), None)
    return checks, {"r": top_rank, "lora_alpha": top_alpha, "use_rslora": rslora, "largest_rank": largest,
                    "vllm_max_lora_rank": vllm}


def build_parser(prog: str = "python -m lorpa.check_adapter") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.error = raise_input_error
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder written by peft's save_pretrained")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m lorpa.check_adapter") -> int:
    args = build_parser(prog).parse_args(argv)
    checks, summary = check_adapter(args.adapter_dir)
    for check in checks:
        verdict = "ok" if not check.problems else "MISMATCH: " + "; ".join(check.problems)
        print(f"{check.name}: rank {check.rank}, scaling {check.peft_scaling:g} in peft, {check.engine_scaling:g} "
              f"in an engine: {verdict}")
    bad = [check for check in checks if check.problems]
    print(f"config: r = {summary['r']}, lora_alpha = {summary['lora_alpha']:g}, use_rslora = {summary['use_rslora']}; "
          f"largest module rank {summary['largest_rank']}; vLLM needs --max-lora-rank "
          f"{summary['vllm_max_lora_rank'] or 'above 512 (not supported)'}")
    if bad:
        print(f"{len(bad)} of {len(checks)} modules would be served differently from peft: merge the adapter "
              "(--merge_final), or prune it again with alpha='fold' (python -m lorpa.prune_adapter IN OUT ... "
              "--alpha fold)")
        return 1
    print(f"all {len(checks)} modules are served as peft serves them")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
