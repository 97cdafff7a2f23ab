"""One cell of a sweep: a config, its flags and its output folder; started, skipped or resumed.

The command is built when the cell starts, on the machine that runs it (a SLURM node sees other
GPUs than the login node), and the cell's output folder decides how: a results.json means finished,
a `checkpoint-*` below it means resume from the latest one, anything else means start afresh (from
the finished run of its LoRA twin as stage 1, when it has one: `reuse.py`).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...checkpoints import write_json_atomic
from .. import commands
from ..results import RESULTS_FILE

LOG_FILE = "train.log"
MANIFEST_FILE = "sweep.json"


@dataclass
class Cell:
    """`name` is the cell's path below the sweep folder, e.g. lora_r8/rte/seed1."""

    name: str
    config: Path
    output_dir: Path
    flags: list[str] = field(default_factory=list)
    stage1_from: Path | None = None  # a LoRA cell's output folder whose run is this cell's stage 1 (sweep/reuse.py)
    accelerate_config: Path | None = None  # run through `accelerate launch --config_file` (e.g. FSDP)

    @property
    def log(self) -> Path:
        return self.output_dir / LOG_FILE

    def finished(self) -> bool:
        return (self.output_dir / RESULTS_FILE).is_file()

    def resumable(self) -> bool:
        return any(self.output_dir.glob("*/checkpoint-*"))

    def stage1_ready(self) -> bool:
        return self.stage1_from is not None and (self.stage1_from / RESULTS_FILE).is_file()


def start_command(cell: Cell, nproc: int) -> list[str]:
    """The run command for the cell's current state: resume from its latest checkpoint, or start."""
    flags = cell.flags + ["--output_dir", str(cell.output_dir)]
    if cell.resumable():
        flags += ["--resume_from_checkpoint", "latest"]
    else:
        flags += ["--overwrite_output_dir", "true"]  # our own folder: at most a log and unfinished files
        if cell.stage1_ready():
            flags += ["--stage1_adapter", str(cell.stage1_from)]
    return commands.command_for(cell.config, flags, nproc, cell.accelerate_config)


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z") + f" ({time.time():.3f})"


def start(cell: Cell, nproc: int, env: dict | None = None, echo: bool = False, cwd: Path | None = None):
    """Start the cell; its output (stdout and stderr) is appended to its log, and echoed if asked.

    Returns (process, thread copying the output); the log gets one line when it starts and one when
    it exits, with wall-clock times, so concurrent cells can be seen from their logs.
    """
    cell.output_dir.mkdir(parents=True, exist_ok=True)
    command = start_command(cell, nproc)
    log = cell.log.open("a", buffering=1)
    log.write(f"=== start {_stamp()}: {shlex.join(command)}\n")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, cwd=cwd, errors="replace")

    def copy():
        for line in process.stdout:
            log.write(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        process.wait()
        log.write(f"=== exit {process.returncode} {_stamp()}\n")
        log.close()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return process, thread


def write_manifest(runs_dir: Path, cells: list[Cell]) -> None:
    """The sweep's planned cells, so that `lorpa.report` can say which are not finished yet."""
    entries = [{**asdict(cell), "config": str(cell.config), "output_dir": _relative(cell.output_dir, runs_dir),
                "stage1_from": None if cell.stage1_from is None else _relative(cell.stage1_from, runs_dir),
                "accelerate_config": None if cell.accelerate_config is None else str(cell.accelerate_config)}
               for cell in cells]
    write_json_atomic(runs_dir / MANIFEST_FILE, {"cells": entries})


def _relative(path: Path, root: Path) -> str:
    """Relative to the sweep folder when inside it, so the folder can be moved or copied."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def read_manifest(runs_dir: Path) -> list[Cell]:
    path = runs_dir / MANIFEST_FILE
    if not path.is_file():
        return []
    entries = json.loads(path.read_text())["cells"]
    return [Cell(e["name"], Path(e["config"]), runs_dir / e["output_dir"], e.get("flags", []),
                 None if e.get("stage1_from") is None else runs_dir / e["stage1_from"],
                 None if e.get("accelerate_config") is None else Path(e["accelerate_config"])) for e in entries]
