"""Prune a saved peft LoRA adapter from its files alone: no base model, no GPU.

    python -m lorpa.prune_adapter ADAPTER_DIR OUTPUT_DIR --target_rank 8 [--scope global] [--score random --seed 1]

The output is a standard peft adapter (per-module ranks and alphas in `rank_pattern` /
`alpha_pattern`) with the tensors `lorpa.prune` gives on the loaded model, plus `prune_report.json`;
every other file of ADAPTER_DIR (tokenizer, README, ...) is copied through. Tensors are read and
written one at a time, so the data in hand is one module's, whatever the size of the model.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open

from .cli import UsageError, raise_usage_error, run_cli
from .lowrank import SVD_SPLITS, kept_error, weight_gram
from .pruning import (
    SCOPES,
    ModulePruning,
    PruneReport,
    _kept_count,
    _pruned_alpha,
    _select_global,
    _select_module,
    _update_config,
    check_module_shapes,
    check_prune_options,
)
from .scoring import GLOBAL_NORMS, elementwise_scores, magnitude_scores, random_scores, rotate

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
REPORT_FILE = "prune_report.json"
# Scores that need only the adapter's A and B (not the model, its data or its gradients).
FILE_SCORES = ("magnitude", "elementwise", "random", "svd")
PREFIX = "base_model.model."  # peft's saved keys start here; lorpa's module names do not
FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>A|B)\.weight$")
DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
SAFETENSORS_DTYPES = {name: dtype for dtype, name in DTYPES.items()}


@dataclass
class AdaptedModule:
    """Where one LoRA module's factors live in the weights file, and its rank and alpha."""

    key_A: str
    key_B: str
    in_features: int
    out_features: int
    rank: int
    alpha: float


class WeightsFile:
    """The tensors of adapter_model.safetensors or adapter_model.bin, read one at a time.

    safetensors' reader memory-maps the file, and every page it touches then stays in this
    process's memory until the file is closed; reading each tensor with a plain read keeps memory
    to the tensors in hand. safetensors still checks the file (header, offsets, size) first.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as checked:
                    self.keys = list(checked.keys())
                    self.metadata = checked.metadata() or {"format": "pt"}
                with open(path, "rb") as stream:
                    length = int.from_bytes(stream.read(8), "little")
                    self._entries = json.loads(stream.read(length))
                self._data_start = 8 + length
                self.shapes = {key: tuple(self._entries[key]["shape"]) for key in self.keys}
                self.dtypes = {key: SAFETENSORS_DTYPES.get(self._entries[key]["dtype"]) for key in self.keys}
            else:
                self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                self.keys = list(self._state)
                self.shapes = {key: tuple(t.shape) for key, t in self._state.items()}
                self.dtypes = {key: t.dtype if t.dtype in DTYPES else None for key, t in self._state.items()}
                self.metadata = {"format": "pt"}
        except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as error:
            raise ValueError(f"cannot read {path}: {first_line(error)}; is it a complete adapter file?") from error
        unknown = [key for key, dtype in self.dtypes.items() if dtype is None]
        if unknown:
            raise ValueError(f"{path}: tensor {unknown[0]} has a data type this tool cannot copy")

    def get(self, key: str) -> torch.Tensor:
        if self.path.suffix != ".safetensors":
            return self._state[key]
        tensor = torch.empty(self.shapes[key], dtype=self.dtypes[key])
        buffer = tensor.reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "rb") as stream:
            stream.seek(self._data_start + self._entries[key]["data_offsets"][0])
            if stream.readinto(buffer) != len(buffer):
                raise ValueError(f"cannot read tensor {key} from {self.path}: the file ends early")
        return tensor


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """peft's alpha / r (alpha / √r with rsLoRA)."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def module_scores(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, score: str, seed: int | None,
                  scale: float = 1.0, global_norm: str = "absolute") -> torch.Tensor:
    """One module's component scores, computed exactly as `lorpa.prune` computes them (float32, CPU)."""
    if score == "svd":
        return rotate("svd", lora_A, lora_B, scale, None).ranking(global_norm)
    if score == "random":
        return random_scores(lora_A.shape[0], 0 if seed is None else seed, name).float()
    scorer = elementwise_scores if score == "elementwise" else magnitude_scores
    return scorer(lora_A.float(), lora_B.float()).float()


def find_adapter(adapter_dir: Path) -> tuple[dict, Path]:
    """The adapter's config and weights file, refusing anything `lorpa.prune` would refuse."""
    if not adapter_dir.is_dir():
        raise ValueError(f"adapter folder {adapter_dir} not found")
    nested = sorted(p.parent.name for p in adapter_dir.glob(f"*/{CONFIG_FILE}"))
    config_path = adapter_dir / CONFIG_FILE
    if nested:
        found = (["(top level)"] if config_path.is_file() else []) + nested
        raise ValueError(
            f"{adapter_dir} holds several adapters ({', '.join(found)}); put the one to prune in a folder of its own"
        )
    if not config_path.is_file():
        raise ValueError(f"{config_path} not found; ADAPTER_DIR must be a folder written by peft's save_pretrained")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{config_path}: prune_adapter works on LoRA adapters, this one is {peft_type or 'not a peft adapter'}")
    if config.get("use_dora"):
        raise ValueError("DoRA adapters cannot be rank-pruned (the magnitude vector depends on all ranks)")
    if config.get("target_parameters"):
        raise ValueError("LoRA on parameters (target_parameters) cannot be rank-pruned; only LoRA on linear layers")
    for name in (SAFETENSORS_FILE, BIN_FILE):
        if (adapter_dir / name).is_file():
            return config, adapter_dir / name
    raise ValueError(f"no {SAFETENSORS_FILE} or {BIN_FILE} in {adapter_dir}")


def adapted_modules(weights: WeightsFile, config: dict) -> dict[str, AdaptedModule]:
    """Every LoRA module of the file, keyed by lorpa's module name, with the rank and alpha peft would build."""
    factors: dict[str, dict[str, str]] = {}
    for key in weights.keys:
        if "lora_magnitude_vector" in key:
            raise ValueError(f"{key}: DoRA adapters cannot be rank-pruned (the magnitude vector depends on all ranks)")
        if "lora_embedding_" in key:
            raise ValueError(f"{key}: only LoRA on linear layers can be rank-pruned, found an embedding adapter")
        match = FACTOR_KEY.match(key)
        if match:
            name = match["module"].removeprefix(PREFIX)
            factors.setdefault(name, {})[match["factor"]] = key
        elif re.search(r"\.lora_[A-Za-z_]+\.", key) and not re.search(r"\.lora_B\.bias$", key):
            raise ValueError(f"tensor {key} is not in peft's saved LoRA format (one adapter, names without the adapter name)")
    if not factors:
        raise ValueError(f"{weights.path} holds no LoRA tensors (no *.lora_A.weight / *.lora_B.weight keys)")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules = {}
    for name, keys in factors.items():
        if set(keys) != {"A", "B"}:
            missing = "lora_B" if "A" in keys else "lora_A"
            raise ValueError(f"{name}: the adapter file has no {missing}.weight for this module")
        shape_A, shape_B = weights.shapes[keys["A"]], weights.shapes[keys["B"]]
        if len(shape_A) != 2 or len(shape_B) != 2:
            raise ValueError(f"{name}: only LoRA on linear layers can be rank-pruned, found lora_A of shape {list(shape_A)}")
        if shape_A[0] != shape_B[1]:
            raise ValueError(f"{name}: lora_A {list(shape_A)} and lora_B {list(shape_B)} disagree on the rank")
        configured = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config.get("r"))
        if configured != shape_A[0]:
            raise ValueError(f"{name}: the tensors have rank {shape_A[0]} but {CONFIG_FILE} gives {configured}")
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config.get("lora_alpha"))
        modules[name] = AdaptedModule(keys["A"], keys["B"], shape_A[1], shape_B[0], shape_A[0], alpha)
    return modules


def check_arguments(modules: dict[str, AdaptedModule], *, target_rank, ratio, score, scope, min_rank, alpha,
                    svd_split="balanced", global_norm="absolute") -> None:
    """The checks `lorpa.check_prune_arguments` makes, from the tensor shapes alone."""
    check_prune_options(target_rank=target_rank, ratio=ratio, score=score, scope=scope, min_rank=min_rank,
                        alpha=alpha, svd_split=svd_split, global_norm=global_norm, scores=FILE_SCORES,
                        where=" for a saved adapter")
    shapes = {name: (m.rank, m.in_features, m.out_features) for name, m in modules.items()}
    check_module_shapes(shapes, target_rank=target_rank, score=score)


def check_output_dir(adapter_dir: Path, output_dir: Path, overwrite: bool) -> None:
    """Never write into, over or around the input; never replace earlier output unless asked."""
    source, target = adapter_dir.resolve(), output_dir.resolve()
    if target == source or source in target.parents:
        raise ValueError(f"OUTPUT_DIR {output_dir} is ADAPTER_DIR or inside it; the input is never overwritten")
    if target in source.parents:
        raise ValueError(f"OUTPUT_DIR {output_dir} contains ADAPTER_DIR; choose a folder outside it")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output path {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"output folder {output_dir} is not empty; pass --overwrite to replace it")


def pruned_alpha(module: AdaptedModule, new_rank: int, alpha, use_rslora: bool):
    """`lorpa.prune`'s alpha rule, applied to a stand-in holding what it reads from a peft layer."""
    layer = SimpleNamespace(lora_alpha={"default": module.alpha}, r={"default": module.rank}, use_rslora={"default": use_rslora})
    return _pruned_alpha(layer, "default", new_rank, alpha)


def pruned_config(config: dict, report: PruneReport) -> dict:
    """The input config with the r / lora_alpha / rank_pattern / alpha_pattern `lorpa.prune` writes."""
    live = SimpleNamespace()
    _update_config(SimpleNamespace(peft_config={"default": live}), "default", report)
    return {**config, **vars(live)}


def write_safetensors(path: Path, tensors, metadata: dict[str, str]) -> None:
    """Write `tensors` ((key, dtype, shape, producer) in file order) one at a time.

    safetensors' own writer needs every tensor in memory at once; this writes the same format
    (header with offsets, then the raw little-endian data) while holding one tensor.
    """
    header, offset = {}, 0
    for key, dtype, shape, _ in tensors:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header = {"__metadata__": metadata, **header}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as stream:
        stream.write(len(encoded).to_bytes(8, "little"))
        stream.write(encoded)
        for key, dtype, shape, produce in tensors:
            tensor = produce().contiguous()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{key}: produced {tensor.dtype} {list(tensor.shape)}, declared {dtype} {list(shape)}")
            stream.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def prune_saved_adapter(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    target_rank: int | None = None,
    ratio: float | None = None,
    score: str = "magnitude",
    scope: str = "module",
    min_rank: int = 1,
    alpha: str | float = "keep_scaling",
    seed: int | None = None,
    svd_split: str = "balanced",
    global_norm: str = "absolute",
    overwrite: bool = False,
) -> PruneReport:
    """Prune the adapter saved in `adapter_dir` into `output_dir`; the options are `lorpa.prune`'s.

    Bad input raises ValueError before anything is written. The output appears all at once (it is
    written to a temporary folder beside `output_dir`, then renamed).
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    config, weights_path = find_adapter(adapter_dir)
    check_output_dir(adapter_dir, output_dir, overwrite)
    weights = WeightsFile(weights_path)
    modules = adapted_modules(weights, config)
    check_arguments(modules, target_rank=target_rank, ratio=ratio, score=score, scope=scope, min_rank=min_rank, alpha=alpha,
                    svd_split=svd_split, global_norm=global_norm)

    rslora = bool(config.get("use_rslora"))

    @functools.lru_cache(maxsize=1)  # A and B of a module are read one after the other
    def source_factors(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(A, B, w): the factors components are kept from, as stored or (svd) rewritten in the update's
        singular basis, and (svd) the components' weight energies, for the prune's error."""
        lora_A, lora_B = weights.get(modules[name].key_A), weights.get(modules[name].key_B)
        if score == "svd":
            rotation = rotate("svd", lora_A, lora_B, 1.0, None, svd_split)
            return rotation.lora_A, rotation.lora_B, rotation.weight_energy
        return lora_A, lora_B, None

    scope_norm = global_norm if scope == "global" else "absolute"
    scores = {
        name: module_scores(name, weights.get(m.key_A), weights.get(m.key_B), score, seed, scaling(m.alpha, m.rank, rslora),
                            scope_norm)
        for name, m in modules.items()
    }
    counts = {name: _kept_count(m.rank, target_rank, ratio, min_rank) for name, m in modules.items()}
    kept = _select_module(scores, counts) if scope == "module" else _select_global(scores, counts, min_rank)

    report = PruneReport(score=score, scope=scope, rewind="none", svd_split=svd_split if score == "svd" else None,
                         global_norm=global_norm if score == "svd" and scope == "global" else None)
    for name, module in modules.items():
        indices = torch.sort(kept[name]).values
        new_alpha = pruned_alpha(module, len(indices), alpha, rslora)
        lora_A, lora_B, energy = source_factors(name)
        gram = energy if energy is not None else weight_gram(lora_A, lora_B)  # `lorpa.lowrank.kept_error`
        old_scale, new_scale = scaling(module.alpha, module.rank, rslora), scaling(new_alpha, len(indices), rslora)
        report.modules[name] = ModulePruning(
            old_rank=module.rank,
            new_rank=len(indices),
            old_alpha=module.alpha,
            new_alpha=new_alpha,
            kept=indices.tolist(),
            scores=scores[name].tolist(),
            relative_error=kept_error(gram, indices, old_scale, new_scale),
        )

    factor_of = {m.key_A: (name, 0) for name, m in modules.items()} | {m.key_B: (name, 1) for name, m in modules.items()}

    def entry(key):
        """(key, dtype, shape, producer) of one output tensor: LoRA factors cut to the kept components."""
        if key not in factor_of:
            return key, weights.dtypes[key], weights.shapes[key], lambda: weights.get(key)
        name, dim = factor_of[key]
        rows = torch.tensor(report.modules[name].kept, dtype=torch.long)
        shape = list(weights.shapes[key])
        shape[dim] = len(rows)
        return key, weights.dtypes[key], tuple(shape), lambda: source_factors(name)[dim].index_select(dim, rows)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.", suffix=".tmp"))
    try:
        staging.chmod(0o777 & ~current_umask())  # mkdtemp's folder is private; the output should not be
        for item in adapter_dir.iterdir():
            if item.name not in (CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE, REPORT_FILE):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        write_safetensors(staging / SAFETENSORS_FILE, [entry(key) for key in weights.keys], weights.metadata)
        write_json(staging / CONFIG_FILE, pruned_config(config, report))
        write_json(staging / REPORT_FILE, report.to_dict())
        replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data) -> None:
    """The layout of lorpa's other JSON outputs; atomicity comes from renaming the whole folder."""
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def replace_folder(staging: Path, output_dir: Path) -> None:
    """Move the finished `staging` folder to `output_dir`; an earlier output is removed only afterwards."""
    if output_dir.is_dir() and any(output_dir.iterdir()):
        retired = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.", suffix=".old"))
        os.replace(output_dir, retired / output_dir.name)
        os.replace(staging, output_dir)
        shutil.rmtree(retired)
    else:
        os.replace(staging, output_dir)  # rename(2) replaces an empty folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lorpa.prune_adapter",
        description="Prune a saved peft LoRA adapter from its files alone (no base model, no GPU) into a standard "
        "peft adapter with per-module rank_pattern / alpha_pattern and prune_report.json; other files are copied.",
        epilog="The tensors equal lorpa.prune's on the loaded model; the output loads with PeftModel.from_pretrained.",
    )
    parser.error = raise_usage_error
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder written by peft's save_pretrained")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="new folder for the pruned adapter")
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--target_rank", type=int, help="rank components kept per module (module scope) or on average (global)")
    amount.add_argument("--ratio", type=float, help="fraction of each module's rank pruned, in [0, 1)")
    parser.add_argument("--score", default="magnitude", metavar="|".join(FILE_SCORES), help="component score (default: magnitude, the paper's)")
    parser.add_argument("--scope", default="module", metavar="|".join(SCOPES), help="module: the same count everywhere; global: one budget over all modules")
    parser.add_argument("--min_rank", type=int, default=1, help="no module keeps fewer components (default: 1)")
    parser.add_argument("--alpha", default="keep_scaling", metavar="keep_scaling|X", help="keep_scaling (keep each module's alpha/r) or a new lora_alpha")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random score")
    parser.add_argument("--svd_split", default="balanced", metavar="|".join(SVD_SPLITS),
                        help="with --score svd, how S is shared by the new factors (default: balanced, √S each)")
    parser.add_argument("--global_norm", default="absolute", metavar="|".join(GLOBAL_NORMS),
                        help="with --score svd --scope global: rank singular values as they are (absolute) or as a "
                             "share of their module's (relative) (default: absolute)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.alpha != "keep_scaling":
        try:
            args.alpha = float(args.alpha)
        except ValueError:
            raise UsageError(f"--alpha must be keep_scaling or a positive number, got {args.alpha!r}") from None
        args.alpha = int(args.alpha) if args.alpha.is_integer() else args.alpha
    return args


def main(argv: list[str] | None = None) -> PruneReport:
    args = parse_args(argv)
    try:
        report = prune_saved_adapter(
            args.adapter_dir, args.output_dir, target_rank=args.target_rank, ratio=args.ratio, score=args.score,
            scope=args.scope, min_rank=args.min_rank, alpha=args.alpha, seed=args.seed, svd_split=args.svd_split,
            global_norm=args.global_norm, overwrite=args.overwrite,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    old, new = sum(report.old_ranks.values()), sum(report.ranks.values())
    print(f"pruned {len(report.modules)} LoRA modules, {old} -> {new} rank components "
          f"({args.scope} scope, {args.score} score); wrote {args.output_dir}")
    return report


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
