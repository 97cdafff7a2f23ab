"""Resuming after a kill at any moment: records are written whole or not at all, and a checkpoint the
kill cut short is recognised and skipped."""

from __future__ import annotations

import json
import os
import secrets
import sys
import zipfile
from pathlib import Path

from safetensors import safe_open

from .errors import InputError
from .stages import Stage


def write_json_atomic(path: str | Path, data) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename: readers (and a run killed at
    any moment, or a power cut) see the old file or the new one. The file gets the permissions any new
    file in the folder gets (the umask), like the Trainer's own outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=2, sort_keys=False, default=str)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (not possible on every platform, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin")
# What accelerate writes for an FSDP run (`save_fsdp_model` / `save_fsdp_optimizer`): a full state dict as one file,
# a sharded one as a distributed-checkpoint folder or one file per process.
FSDP_MODEL_PREFIX, FSDP_OPTIMIZER_PREFIX = "pytorch_model_fsdp", "optimizer"


def checkpoint_problem(path: Path) -> str | None:
    """Why a `checkpoint-N` folder cannot be resumed (None if it can).

    The Trainer writes trainer_state.json last, so a folder without a readable one was cut off while
    saving. Weight and optimizer files are checked for truncation by their headers, which is cheap.
    """
    try:
        json.loads(Path(path, "trainer_state.json").read_text())
    except (OSError, ValueError) as error:
        return f"no readable trainer_state.json ({type(error).__name__})"
    weights = [Path(path, name) for name in WEIGHT_FILES if Path(path, name).is_file()]
    sharded = [entry for entry in Path(path).iterdir() if entry.name.startswith(FSDP_MODEL_PREFIX)]
    if not weights and not sharded:
        return "no model weights"
    for file in weights:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as error:  # safetensors raises its own error types for a damaged header
                return f"{file.name} is damaged ({str(error).strip().splitlines()[0]})"
    optimizers = [entry for entry in Path(path).iterdir() if entry.name.startswith(FSDP_OPTIMIZER_PREFIX)]
    if not optimizers and not any(Path(path).glob("global_step*")):  # DeepSpeed's own layout
        return "no optimizer state (optimizer.pt, or optimizer.bin / optimizer_0 as FSDP saves it)"
    for file in sorted(f for f in Path(path).iterdir() if f.suffix in (".pt", ".pth", ".bin")):
        try:  # torch.save writes zip archives; a cut-off one has no central directory
            zipfile.ZipFile(file).close()
        except (OSError, zipfile.BadZipFile) as error:
            return f"{file.name} is damaged ({error})"
    return None


def find_resume_point(checkpoint: str | None, output_dir: str, stages: list[Stage]) -> tuple[int, str | None]:
    """(index of the stage to start in, checkpoint to resume it from).

    `checkpoint` is a path to a `checkpoint-N` folder inside a stage folder, or "latest": the newest
    complete checkpoint of the latest stage that has one; incomplete ones (a run killed while saving)
    are skipped with a message, and when all are incomplete the run starts from the beginning.
    """
    if checkpoint is None:
        return 0, None
    names = [stage.name for stage in stages]
    if checkpoint == "latest":
        skipped = False
        for index in reversed(range(len(stages))):
            found = sorted(
                Path(output_dir, names[index]).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
            )
            for path in reversed(found):
                problem = checkpoint_problem(path)
                if problem is None:
                    return index, str(path)
                print(f"skipping incomplete checkpoint {path}: {problem}", file=sys.stderr, flush=True)
                skipped = True
        if not skipped:
            raise InputError(f"no checkpoint to resume under {output_dir}")
        print(f"no complete checkpoint under {output_dir}: training starts from the beginning", file=sys.stderr,
              flush=True)
        return 0, None
    path = Path(checkpoint)
    if not path.is_dir():
        raise InputError(f"checkpoint not found: {checkpoint}")
    if path.parent.name not in names:
        raise InputError(f"checkpoint {checkpoint} is not inside a stage folder ({', '.join(names)})")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise InputError(f"checkpoint {checkpoint} cannot be resumed: {problem}; resume from an earlier checkpoint "
                         "or pass --resume_from_checkpoint latest, which skips broken ones")
    return names.index(path.parent.name), str(path)


def describe(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def redo_from(output_dir: str, stages: list[Stage], start: int) -> str:
    """How to get past a damaged record of the prune before stage `start`: redo it from the stage before."""
    previous = stages[start - 1].name
    found = sorted(Path(output_dir, previous).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    usable = [p for p in found if checkpoint_problem(p) is None]
    if not usable:
        return f"no {previous} checkpoint is left to redo it from: start again with --overwrite_output_dir"
    return (f"resume from {previous} with --resume_from_checkpoint {usable[-1]} (the pruning is redone "
            "deterministically)")


def read_records(output_dir: str, stages: list[Stage], start: int, name_of) -> list[dict]:
    """The JSON record `name_of(index)` of every stage before `start` that has one (None: no record), for resuming
    stage `start`; a missing or damaged one is one line that says the way out."""
    records = []
    for index in range(start):
        name = name_of(index)
        if name is None:
            continue
        try:
            records.append(json.loads(Path(output_dir, name).read_text()))
        except (OSError, ValueError) as error:
            raise InputError(f"{output_dir}: the record of the pruning step is missing or damaged "
                             f"({describe(error)}); {redo_from(output_dir, stages, start)}") from error
    return records
