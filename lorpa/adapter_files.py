"""A saved peft LoRA adapter, read and written from its files alone: no base model, no transformers, no peft.

`AdapterFolder` is the one reader every file tool uses (`lorpa prune`, `inspect`, `check`): the config read as
peft reads it, the weights file, and each LoRA module's tensor keys, rank and alpha. Tensors are read one at a
time with plain reads (safetensors' memory map would keep every page it touched). Writing goes to a staging
folder beside the output that is renamed into place, so an output is whole or absent, and a staging folder left
by a killed run is removed by the next run on that output.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import InputError
from .options import FILE_SCORES, PruneOptions, resolve
from .plan import ModuleFactors, PrunePlan, PruneReport, config_changes
from .stages import PRUNE_REPORT_FILE, RESULTS_FILE

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
TOLERANCE_FILE = "tolerance_search.json"
CARD_FILE = "README.md"  # the model card: written anew for every output, never copied from the input
PREFIX = "base_model.model."  # peft's saved keys start here; lorpa's module names do not
FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>A|B)\.weight$")
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "use_rslora": False}  # LoraConfig's, for keys a config leaves out
DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
SAFETENSORS_DTYPES = {name: dtype for dtype, name in DTYPES.items()}


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def pattern_key(patterns, name: str) -> str | None:
    """The key of `rank_pattern` / `alpha_pattern` that peft applies to module `name` (peft's `get_pattern_key`: a
    regular expression matched against the end of the name, at a dot), or None."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), None)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_config(path: Path) -> dict:
    """adapter_config.json as peft reads it: LoraConfig's defaults for what it leaves out, and values peft could not
    build a layer from (a string alpha, a rank of 0, NaN) refused."""
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise InputError(f"{path} must hold a JSON object")
    config = {**PEFT_DEFAULTS, **config}
    for key in ("rank_pattern", "alpha_pattern"):
        config[key] = config.get(key) or {}
    ranks = [("r", config["r"])] + [(f"rank_pattern[{k!r}]", v) for k, v in config["rank_pattern"].items()]
    alphas = [("lora_alpha", config["lora_alpha"])]
    alphas += [(f"alpha_pattern[{k!r}]", v) for k, v in config["alpha_pattern"].items()]
    for key, value in ranks:
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise InputError(f"{path}: {key} must be a positive integer, as peft needs it, got {value!r}")
    for key, value in alphas:
        if not _number(value):
            raise InputError(f"{path}: {key} must be a finite number, as peft needs it, got {value!r}")
    if not isinstance(config["use_rslora"], bool):
        raise InputError(f"{path}: use_rslora must be true or false, got {config['use_rslora']!r}")
    return config


class WeightsFile:
    """The tensors of adapter_model.safetensors or adapter_model.bin, read one at a time."""

    def __init__(self, path: Path):
        self.path = path
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as checked:  # checks the header, offsets and size
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
            raise InputError(f"cannot read {path}: {first_line(error)}; is it a complete adapter file?") from error
        unknown = [key for key, dtype in self.dtypes.items() if dtype is None]
        if unknown:
            raise InputError(f"{path}: tensor {unknown[0]} has a data type this tool cannot copy")

    def get(self, key: str) -> torch.Tensor:
        if self.path.suffix != ".safetensors":
            return self._state[key]
        tensor = torch.empty(self.shapes[key], dtype=self.dtypes[key])
        buffer = tensor.reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "rb") as stream:
            stream.seek(self._data_start + self._entries[key]["data_offsets"][0])
            if stream.readinto(buffer) != len(buffer):
                raise InputError(f"cannot read tensor {key} from {self.path}: the file ends early")
        return tensor

    def size(self, key: str) -> int:
        """Bytes of the tensor's data."""
        return math.prod(self.shapes[key]) * torch.empty((), dtype=self.dtypes[key]).element_size()


def factor_keys(keys) -> dict[str, dict[str, str]]:
    """{module name: {"A": key, "B": key}} for every `*.lora_A.weight` / `*.lora_B.weight` key (a module may lack
    one: the caller decides whether that is an error)."""
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        match = FACTOR_KEY.match(key)
        if match:
            found.setdefault(match["module"].removeprefix(PREFIX), {})[match["factor"]] = key
    return found


@dataclass
class AdaptedModule:
    """Where one LoRA module's factors live in the weights file, and the rank and alpha peft builds it with."""

    key_A: str
    key_B: str
    in_features: int
    out_features: int
    rank: int
    alpha: float


def find_config(folder: Path) -> Path:
    if not folder.is_dir():
        raise InputError(f"adapter folder {folder} not found")
    config_path = folder / CONFIG_FILE
    nested = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_FILE}"))
    if nested:
        found = (["(top level)"] if config_path.is_file() else []) + nested
        raise InputError(f"{folder} holds several adapters ({', '.join(found)}); give the folder of one of them")
    if not config_path.is_file():
        raise InputError(f"{config_path} not found; the folder must be one written by peft's save_pretrained")
    return config_path


class AdapterFolder:
    """A saved LoRA adapter: its config (as peft reads it), weights file and modules, refusing what cannot be
    rank-pruned (other peft types, DoRA, embedding or parameter adapters)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.config = read_config(find_config(self.folder))
        peft_type = self.config.get("peft_type")
        if peft_type != "LORA":
            raise InputError(f"{self.folder / CONFIG_FILE}: only LoRA adapters can be rank-pruned, this one is "
                             f"{peft_type or 'not a peft adapter'}")
        if self.config.get("use_dora"):
            raise InputError("DoRA adapters cannot be rank-pruned (the magnitude vector depends on all ranks)")
        if self.config.get("target_parameters"):
            raise InputError("LoRA on parameters (target_parameters) cannot be rank-pruned; only LoRA on linear "
                             "layers")
        path = next((self.folder / n for n in (SAFETENSORS_FILE, BIN_FILE) if (self.folder / n).is_file()), None)
        if path is None:
            raise InputError(f"no {SAFETENSORS_FILE} or {BIN_FILE} in {self.folder}")
        self.weights = WeightsFile(path)
        self.modules = self._modules()

    @property
    def use_rslora(self) -> bool:
        return self.config["use_rslora"]

    def configured(self, name: str) -> tuple[int, float]:
        """(rank, alpha) peft builds module `name` with."""
        ranks, alphas = self.config["rank_pattern"], self.config["alpha_pattern"]
        rank_key, alpha_key = pattern_key(ranks, name), pattern_key(alphas, name)
        return (self.config["r"] if rank_key is None else ranks[rank_key],
                self.config["lora_alpha"] if alpha_key is None else alphas[alpha_key])

    def _modules(self) -> dict[str, AdaptedModule]:
        for key in self.weights.keys:
            if "lora_magnitude_vector" in key:
                raise InputError(f"{key}: DoRA adapters cannot be rank-pruned (the magnitude vector depends on all "
                                 "ranks)")
            if "lora_embedding_" in key:
                raise InputError(f"{key}: only LoRA on linear layers can be rank-pruned, found an embedding adapter")
            foreign = re.search(r"\.lora_[A-Za-z_]+\.", key) and not FACTOR_KEY.match(key)
            if foreign and not key.endswith(".lora_B.bias"):
                raise InputError(f"tensor {key} is not in peft's saved LoRA format (one adapter, names without the "
                                 "adapter name)")
        found = factor_keys(self.weights.keys)
        if not found:
            raise InputError(f"{self.weights.path} holds no LoRA tensors (no *.lora_A.weight / *.lora_B.weight keys)")
        modules = {}
        for name, keys in found.items():
            if set(keys) != {"A", "B"}:
                missing = "lora_B" if "A" in keys else "lora_A"
                raise InputError(f"{name}: the adapter file has no {missing}.weight for this module")
            shape_A, shape_B = self.weights.shapes[keys["A"]], self.weights.shapes[keys["B"]]
            if len(shape_A) != 2 or len(shape_B) != 2:
                raise InputError(f"{name}: only LoRA on linear layers can be rank-pruned, found lora_A of shape "
                                 f"{list(shape_A)}")
            if shape_A[0] != shape_B[1]:
                raise InputError(f"{name}: lora_A {list(shape_A)} and lora_B {list(shape_B)} disagree on the rank")
            rank, alpha = self.configured(name)
            if rank != shape_A[0]:
                raise InputError(f"{name}: the tensors have rank {shape_A[0]} but {CONFIG_FILE} gives {rank}")
            modules[name] = AdaptedModule(keys["A"], keys["B"], shape_A[1], shape_B[0], shape_A[0], alpha)
        return modules

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        module = self.modules[name]
        return self.weights.get(module.key_A), self.weights.get(module.key_B)

    def module_factors(self) -> dict[str, ModuleFactors]:
        """Every module as the plan reads it: its tensors are read from the file when the plan asks for them."""
        return ReadWithProgress({name: ModuleFactors(partial(self.factors, name), module.rank, module.alpha,
                                                     self.use_rslora) for name, module in self.modules.items()})


def progress(items, what: str, unit: str = "module"):
    """`items` with a progress bar on a terminal (stderr), and nothing in a log."""
    from tqdm import tqdm

    return tqdm(items, desc=what, unit=unit, leave=False, disable=not sys.stderr.isatty())


class ReadWithProgress(dict):
    """A {module: ModuleFactors} mapping whose iteration shows reading progress on a terminal."""

    def items(self):
        return progress(super().items(), "reading", unit="module")


def write_safetensors(path: Path, tensors, metadata: dict[str, str]) -> None:
    """Write `tensors` ((key, dtype, shape, producer) in file order) one at a time, in safetensors' format (header
    with offsets, then the raw little-endian data): its own writer needs every tensor in memory at once."""
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
        for key, dtype, shape, produce in progress(tensors, "writing", unit="tensor"):
            tensor = produce().contiguous()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{key}: produced {tensor.dtype} {list(tensor.shape)}, declared {dtype} "
                                   f"{list(shape)}")
            stream.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def write_pruned_adapter(adapter: AdapterFolder, plan: PrunePlan, output_dir: Path, config: dict,
                         describe: Callable[[Path], dict[str, str]] | None = None) -> None:
    """The pruned adapter: every tensor of the input (LoRA factors replaced by the plan's), `config`, the prune
    report and the input folder's other files (a tokenizer) but its model card and a run's records (subfolders such
    as checkpoints, `results.json`: they describe the source's training), written in a staging folder beside
    `output_dir` and renamed into place. `describe(staged folder)` gives more files ({name: text}, e.g. a new
    card) from the finished adapter before it is moved into place."""
    weights = adapter.weights
    cut = lru_cache(maxsize=1)(plan.factors)  # a module's A and B are written one after the other: one cut
    factor_of = {m.key_A: (name, 0) for name, m in adapter.modules.items()}
    factor_of |= {m.key_B: (name, 1) for name, m in adapter.modules.items()}

    def entry(key):
        """(key, dtype, shape, producer) of one output tensor."""
        if key not in factor_of:
            return key, weights.dtypes[key], weights.shapes[key], lambda: weights.get(key)
        name, dim = factor_of[key]
        shape = list(weights.shapes[key])
        shape[dim] = len(plan.report.modules[name].kept)
        return key, weights.dtypes[key], tuple(shape), lambda: cut(name)[dim]

    left_behind = {CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE, PRUNE_REPORT_FILE, TOLERANCE_FILE, CARD_FILE,
                   RESULTS_FILE}
    staging = staging_folder(output_dir, "tmp")
    try:
        for item in adapter.folder.iterdir():
            if item.is_file() and item.name not in left_behind:
                shutil.copy2(item, staging / item.name)
        entries = [entry(key) for key in weights.keys]
        write_safetensors(staging / SAFETENSORS_FILE, entries, weights.metadata)
        write_json(staging / CONFIG_FILE, config)
        write_json(staging / PRUNE_REPORT_FILE, plan.report.to_dict())
        for name, text in (describe(staging) if describe else {}).items():
            (staging / name).write_text(text)
        replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def files_options(adapter_dir, output_dir, options: PruneOptions | None, keywords: dict, overwrite: bool):
    """The checks of a prune from files that need no tensor, made before any is read: (options with the default
    score of a cut no retraining follows, the input folder, the output folder)."""
    options = resolve(options, keywords, retrained=False)
    if options.score == "activation":
        raise InputError("the activation score needs the model's inputs (lorpa.calibrate) for a saved adapter; prune "
                         f"the model in memory, or choose one of {', '.join(FILE_SCORES)}")
    if options.score not in FILE_SCORES:
        raise InputError(f"unknown score {options.score!r} for a saved adapter (it needs the training run); choose "
                         f"one of {', '.join(FILE_SCORES)}")
    if options.rewind != "none":
        raise InputError("rewind='init' needs the injection-time values, which a saved adapter does not hold")
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    find_config(adapter_dir)
    check_output_dir(adapter_dir, output_dir, overwrite)
    remove_stale_staging(output_dir)
    return options, adapter_dir, output_dir


def pruned_config(adapter: AdapterFolder, report: PruneReport) -> dict:
    """The input's config with the fields a prune rewrites (`lorpa.plan.config_changes`)."""
    return {**adapter.config, **config_changes(report)}


def json_text(data) -> str:
    """The layout of lorpa's JSON outputs."""
    return json.dumps(data, indent=2, default=str) + "\n"


def write_json(path: Path, data) -> None:
    """Atomicity comes from renaming the whole folder."""
    path.write_text(json_text(data))


def check_output_dir(source: Path, output_dir: Path, overwrite: bool) -> None:
    """Never write into, over or around the input; never replace earlier output unless asked; the output's parent
    must be a writable folder. Checked before any work starts."""
    source_path, target = source.resolve(), output_dir.resolve()
    if target == source_path or source_path in target.parents:
        raise InputError(f"OUTPUT_DIR {output_dir} is ADAPTER_DIR or inside it; the input is never overwritten")
    if target in source_path.parents:
        raise InputError(f"OUTPUT_DIR {output_dir} contains ADAPTER_DIR; choose a folder outside it")
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"output path {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise InputError(f"output folder {output_dir} is not empty; pass --overwrite to replace it")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {output_dir}: {parent} is not a writable folder")


def _staging_prefix(output_dir: Path) -> str:
    return f".{output_dir.name}.lorpa-"


def remove_stale_staging(output_dir: Path) -> None:
    """Remove the staging folders that a killed run left beside `output_dir` (their process is gone)."""
    if not output_dir.parent.is_dir():
        return
    for entry in output_dir.parent.glob(_staging_prefix(output_dir) + "*"):
        pid = entry.name.removeprefix(_staging_prefix(output_dir)).split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry, ignore_errors=True)


def staging_folder(output_dir: Path, kind: str) -> Path:
    """A new private folder beside `output_dir`, named after this process so that a later run can tell it is stale."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f"{_staging_prefix(output_dir)}{os.getpid()}.",
                                 suffix=f".{kind}"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_folder(staging: Path, output_dir: Path) -> None:
    """Move the finished `staging` folder to `output_dir`; an earlier output is removed only afterwards."""
    staging.chmod(0o777 & ~current_umask())  # mkdtemp's folder is private; the output should not be
    if output_dir.is_dir() and any(output_dir.iterdir()):
        retired = staging_folder(output_dir, "old")
        os.replace(output_dir, retired / output_dir.name)
        os.replace(staging, output_dir)
        shutil.rmtree(retired)
    else:
        os.replace(staging, output_dir)  # rename(2) replaces an empty folder
