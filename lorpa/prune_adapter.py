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
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open

from .cli import UsageError, raise_usage_error, run_cli
from .lowrank import SVD_SPLITS, kept_error, weight_gram
from .budgets import Budget, choose, parameters
from .pruning import (
    SCOPES,
    ModulePruning,
    PruneReport,
    _pruned_alpha,
    _update_config,
    check_module_shapes,
    check_prune_options,
)
from .scoring import GLOBAL_NORMS, elementwise_scores, magnitude_scores, random_scores, rotate
from .tolerance import Candidate, ToleranceSearch, search_budget

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
REPORT_FILE = "prune_report.json"
TOLERANCE_FILE = "tolerance_search.json"
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


def check_arguments(modules: dict[str, AdaptedModule], **options) -> Budget:
    """The checks `lorpa.check_prune_arguments` makes, from the tensor shapes alone; returns the budget."""
    budget = check_prune_options(**options, scores=FILE_SCORES, where=" for a saved adapter")
    shapes = {name: (m.rank, m.in_features, m.out_features) for name, m in modules.items()}
    check_module_shapes(shapes, target_rank=budget.target_rank, score=options["score"], total_rank=budget.total_rank)
    return budget


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


class SavedAdapter:
    """A saved adapter, read one module at a time: its scores are computed once, and any budget then gives a
    prune report (`plan`) and a pruned copy (`write`) without reading more than one module's tensors at once."""

    def __init__(self, adapter_dir: Path, *, score: str = "magnitude", seed: int | None = None,
                 svd_split: str = "balanced", scope_norm: str = "absolute"):
        self.adapter_dir = adapter_dir
        self.config, weights_path = find_adapter(adapter_dir)
        self.weights = WeightsFile(weights_path)
        self.modules = adapted_modules(self.weights, self.config)
        self.score, self.svd_split = score, svd_split
        self.rslora = bool(self.config.get("use_rslora"))
        self.scores, self.grams = {}, {}
        if score in FILE_SCORES:  # an unknown score is refused by the option checks, before any tensor is read
            for name, m in self.modules.items():
                lora_A, lora_B = self.weights.get(m.key_A), self.weights.get(m.key_B)
                self.scores[name] = module_scores(name, lora_A, lora_B, score, seed, self.scale(name), scope_norm)
                # `kept_error`'s H: the singular basis's weight energies, or the Gram of the stored factors
                self.grams[name] = (rotate("svd", lora_A, lora_B, 1.0, None).weight_energy if score == "svd"
                                    else weight_gram(lora_A, lora_B))

    def scale(self, name: str) -> float:
        module = self.modules[name]
        return scaling(module.alpha, module.rank, self.rslora)

    @functools.lru_cache(maxsize=1)  # A and B of a module are written one after the other
    def source_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors components are kept from: as stored, or (svd) rewritten in the update's singular basis."""
        lora_A, lora_B = self.weights.get(self.modules[name].key_A), self.weights.get(self.modules[name].key_B)
        if self.score == "svd":
            rotation = rotate("svd", lora_A, lora_B, 1.0, None, self.svd_split)
            return rotation.lora_A, rotation.lora_B
        return lora_A, lora_B

    def plan(self, budget: Budget, *, scope: str, alpha, global_norm: str) -> PruneReport:
        """The prune report `lorpa.prune` would give on the loaded model, for this budget."""
        kept = choose(self.scores, budget, scope)
        report = PruneReport(score=self.score, scope=scope, rewind="none",
                             svd_split=self.svd_split if self.score == "svd" else None,
                             global_norm=global_norm if self.score == "svd" and scope == "global" else None,
                             folded=alpha == "fold")
        for name, module in self.modules.items():
            indices = torch.sort(kept[name]).values
            new_alpha = pruned_alpha(module, len(indices), alpha, self.rslora)
            kept_scale = self.scale(name) if alpha == "fold" else scaling(new_alpha, len(indices), self.rslora)
            report.modules[name] = ModulePruning(
                old_rank=module.rank,
                new_rank=len(indices),
                old_alpha=module.alpha,
                new_alpha=new_alpha,
                kept=indices.tolist(),
                scores=self.scores[name].tolist(),
                relative_error=kept_error(self.grams[name], indices, self.scale(name), kept_scale),
            )
        return report

    def write(self, report: PruneReport, output_dir: Path) -> None:
        """The pruned adapter, built in a temporary folder beside `output_dir` and renamed into place."""
        weights, modules = self.weights, self.modules
        factor_of = {m.key_A: (name, 0) for name, m in modules.items()} | {m.key_B: (name, 1) for name, m in modules.items()}

        def entry(key):
            """(key, dtype, shape, producer) of one output tensor: LoRA factors cut to the kept components."""
            if key not in factor_of:
                return key, weights.dtypes[key], weights.shapes[key], lambda: weights.get(key)
            name, dim = factor_of[key]
            rows = torch.tensor(report.modules[name].kept, dtype=torch.long)
            shape = list(weights.shapes[key])
            shape[dim] = len(rows)
            fold = self.scale(name) if report.folded and dim == 1 else None

            def produce():
                tensor = self.source_factors(name)[dim].index_select(dim, rows)
                return tensor if fold is None else (tensor.float() * fold).to(tensor.dtype)

            return key, weights.dtypes[key], tuple(shape), produce

        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.", suffix=".tmp"))
        try:
            staging.chmod(0o777 & ~current_umask())  # mkdtemp's folder is private; the output should not be
            for item in self.adapter_dir.iterdir():
                if item.name not in (CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE, REPORT_FILE, TOLERANCE_FILE):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
            write_safetensors(staging / SAFETENSORS_FILE, [entry(key) for key in weights.keys], weights.metadata)
            write_json(staging / CONFIG_FILE, pruned_config(self.config, report))
            write_json(staging / REPORT_FILE, report.to_dict())
            replace_folder(staging, output_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def prune_saved_adapter(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
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
    find_adapter(adapter_dir)
    check_output_dir(adapter_dir, output_dir, overwrite)
    options = dict(target_rank=target_rank, ratio=ratio, energy=energy, total_rank=total_rank, score=score, scope=scope,
                   min_rank=min_rank, max_rank=max_rank, rank_multiple=rank_multiple, alpha=alpha, svd_split=svd_split,
                   global_norm=global_norm)
    check_prune_options(**options, scores=FILE_SCORES, where=" for a saved adapter")  # before any tensor is read
    adapter = SavedAdapter(adapter_dir, score=score, seed=seed, svd_split=svd_split,
                           scope_norm=global_norm if scope == "global" else "absolute")
    budget = check_arguments(adapter.modules, **options)
    report = adapter.plan(budget, scope=scope, alpha=alpha, global_norm=global_norm)
    adapter.write(report, output_dir)
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


def run_evaluation(command: list[str], adapter: Path) -> float:
    """The score `command` prints on its last line for `adapter` (each `{adapter}` in it is replaced by the folder)."""
    argv = [part.replace("{adapter}", str(adapter)) for part in command]
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except OSError as error:
        raise ValueError(f"--evaluate: cannot run {argv[0]}: {first_line(error)}") from None
    if done.returncode != 0:
        raise ValueError(f"--evaluate exited {done.returncode} on {adapter}: {(done.stderr.strip().splitlines() or [''])[-1]}")
    lines = done.stdout.strip().splitlines()
    try:
        return float(lines[-1].split()[-1])
    except (IndexError, ValueError):
        raise ValueError(f"--evaluate printed no score on its last line for {adapter} (it must end with a number)") from None


def prune_saved_adapter_to_tolerance(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tolerance: float,
    evaluate: list[str],
    score: str = "svd",
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_multiple: int = 1,
    alpha: str | float = "keep_scaling",
    seed: int | None = None,
    svd_split: str = "balanced",
    global_norm: str = "absolute",
    overwrite: bool = False,
) -> tuple[PruneReport, ToleranceSearch]:
    """The smallest global budget whose score, as `evaluate` prints it for each candidate folder, is within
    `tolerance` of the input adapter's (`lorpa.tolerance`); every candidate goes to OUTPUT_DIR/tolerance_search.json."""
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    find_adapter(adapter_dir)
    check_output_dir(adapter_dir, output_dir, overwrite)
    options = dict(total_rank=1, score=score, scope="global", min_rank=min_rank, max_rank=max_rank,
                   rank_multiple=rank_multiple, alpha=alpha, svd_split=svd_split, global_norm=global_norm)
    check_prune_options(**options, scores=FILE_SCORES, where=" for a saved adapter")
    if not evaluate:
        raise ValueError("--tolerance needs --evaluate COMMAND, which prints a score for the adapter folder {adapter}")
    adapter = SavedAdapter(adapter_dir, score=score, seed=seed, svd_split=svd_split, scope_norm=global_norm)
    check_arguments(adapter.modules, **options)
    shapes = {name: (m.in_features, m.out_features) for name, m in adapter.modules.items()}
    limits = Budget(total_rank=1, min_rank=min_rank, max_rank=max_rank, rank_multiple=rank_multiple)
    ranks = {name: m.rank for name, m in adapter.modules.items()}

    def plan(total_rank: int) -> PruneReport:
        budget = Budget(total_rank=total_rank, min_rank=min_rank, max_rank=max_rank, rank_multiple=rank_multiple)
        return adapter.plan(budget, scope="global", alpha=alpha, global_norm=global_norm)

    def candidate(total_rank: int) -> Candidate:
        report = plan(total_rank)
        folder = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.candidate-"))
        try:
            target = folder / "adapter"
            adapter.write(report, target)
            return Candidate(sum(report.ranks.values()), parameters(shapes, report.ranks), run_evaluation(evaluate, target))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    reference = run_evaluation(evaluate, adapter_dir)
    search = search_budget(candidate, sum(limits.bounds(r)[0] for r in ranks.values()),
                           sum(limits.bounds(r)[1] for r in ranks.values()), sum(ranks.values()),
                           parameters(shapes, ranks), reference, tolerance)
    report = plan(search.kept)
    adapter.write(report, output_dir)
    write_json(output_dir / TOLERANCE_FILE, search.to_dict())
    return report, search


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
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--target_rank", type=int, help="rank components kept per module (module scope) or on average (global)")
    amount.add_argument("--ratio", type=float, help="fraction of each module's rank pruned, in [0, 1)")
    amount.add_argument("--energy", type=float, help="with --score svd: the share of Σσ² kept, in (0, 1]: per module (module "
                                                     "scope, as peft's convert_to_lora with a float rank) or one threshold "
                                                     "over all modules (global)")
    amount.add_argument("--total_rank", type=int, help="rank components kept over all modules (global scope)")
    amount.add_argument("--tolerance", type=float, help="the smallest global budget whose score (from --evaluate) is within "
                                                        "this much of the input adapter's")
    parser.add_argument("--score", default="magnitude", metavar="|".join(FILE_SCORES), help="component score (default: magnitude, the paper's)")
    parser.add_argument("--scope", default="module", metavar="|".join(SCOPES), help="module: the same count everywhere; global: one budget over all modules")
    parser.add_argument("--min_rank", type=int, default=1, help="no module keeps fewer components (default: 1)")
    parser.add_argument("--max_rank", type=int, default=None, help="no module keeps more (a serving engine's --max-lora-rank)")
    parser.add_argument("--rank_multiple", type=int, default=1, help="every kept rank is a multiple of this (default: 1)")
    parser.add_argument("--alpha", default="keep_scaling", metavar="keep_scaling|fold|X",
                        help="keep_scaling (keep each module's alpha/r), fold (scaling multiplied into B, alpha = rank: "
                             "scaling 1, served alike by every engine) or a new lora_alpha")
    parser.add_argument("--evaluate", default=None, metavar="COMMAND",
                        help="with --tolerance: a command that scores the adapter folder named by {adapter} in it and "
                             "prints the score (higher is better) as the last word of its output, e.g. "
                             "\"python my_eval.py --adapter {adapter}\"")
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
    if args.alpha not in ("keep_scaling", "fold"):
        try:
            args.alpha = float(args.alpha)
        except ValueError:
            raise UsageError(f"--alpha must be keep_scaling, fold or a positive number, got {args.alpha!r}") from None
        args.alpha = int(args.alpha) if args.alpha.is_integer() else args.alpha
    if args.evaluate is not None and args.tolerance is None:
        raise UsageError("--evaluate scores the candidates of --tolerance; give --tolerance T too")
    if all(getattr(args, name) is None for name in ("target_rank", "ratio", "energy", "total_rank", "tolerance")):
        raise UsageError("give one of --target_rank, --ratio, --energy, --total_rank or --tolerance")
    try:
        args.evaluate = None if args.evaluate is None else shlex.split(args.evaluate)
    except ValueError as error:
        raise UsageError(f"--evaluate: {error}") from None
    return args


def main(argv: list[str] | None = None) -> PruneReport:
    args = parse_args(argv)
    common = dict(score=args.score, min_rank=args.min_rank, max_rank=args.max_rank, rank_multiple=args.rank_multiple,
                  alpha=args.alpha, seed=args.seed, svd_split=args.svd_split, global_norm=args.global_norm,
                  overwrite=args.overwrite)
    try:
        if args.tolerance is not None:
            report, search = prune_saved_adapter_to_tolerance(args.adapter_dir, args.output_dir, tolerance=args.tolerance,
                                                              evaluate=args.evaluate, **common)
            for candidate in search.candidates:
                print(f"candidate: total rank {candidate.total_rank}, {candidate.parameters} parameters, score {candidate.score:g}")
            print(f"kept total rank {search.kept} of {search.full_rank}: the smallest within {args.tolerance:g} of the "
                  f"input's {search.reference:g}" + ("" if search.within else " (none within it: the largest --max_rank allows)"))
        else:
            report = prune_saved_adapter(args.adapter_dir, args.output_dir, target_rank=args.target_rank, ratio=args.ratio,
                                         energy=args.energy, total_rank=args.total_rank, scope=args.scope, **common)
    except ValueError as error:
        raise UsageError(str(error)) from error
    old, new = sum(report.old_ranks.values()), sum(report.ranks.values())
    print(f"pruned {len(report.modules)} LoRA modules, {old} -> {new} rank components "
          f"({report.scope} scope, {args.score} score); wrote {args.output_dir}")
    return report


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
