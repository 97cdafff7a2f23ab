"""LoRPA under FSDP: the prune goes through the adapter's files.

A model sharded by FSDP keeps every process's slice of each LoRA factor, and its parameters cannot be
replaced by pruned ones in place. So after a stage the Trainer saves the adapter gathered in full (every
process takes part, process 0 writes it), process 0 prunes it from its files (`lorpa.prune_adapter`,
which gives the tensors `lorpa.prune` gives in memory), every process loads that one pruned adapter onto
a freshly loaded base model, and the next stage's Trainer shards it afresh: every process keeps process
0's choice, as under DDP, and a stage-2 checkpoint resumes as the run scripts resume any stage 2.

The scores that need the model itself (`sensitivity`, `activation`), rewinding and the tolerance search
are not available this way.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError
from .options import FILE_SCORES, PruneOptions
from .plan import PruneReport
from .prune_adapter import prune_saved_adapter
from .stages import PRUNE_REPORT_FILE

STAGE_ADAPTER_DIR = "adapter"  # inside a stage's folder: the adapter as that stage ended, before its prune


def prunes_from_files(trainer) -> bool:
    """Whether the stage was trained sharded (FSDP), so that its prune must go through files."""
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def fsdp_requested(args) -> bool:
    """Whether the Trainer will shard: `--fsdp` / `fsdp_config`, or an `accelerate launch` FSDP config."""
    return bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_sharded_options(options: PruneOptions, calibrates: bool) -> None:
    """The options a prune through files can honour; InputError names the others."""
    problems = [f"score {options.score!r}"] if options.score not in FILE_SCORES else []
    problems += ["rewind 'init'"] if options.rewind == "init" else []
    problems += ["a calibration (activation score, calibration_batches)"] if calibrates else []
    problems += ["a tolerance search"] if options.tolerance is not None else []
    if problems:
        raise InputError(f"under FSDP LoRPA prunes the gathered adapter from its files, without the model: "
                         f"{', '.join(problems)} cannot be used; choose the score from {', '.join(FILE_SCORES)}")


def prune_through_files(trainer, stage_dir: str | Path, pruned_dir: str | Path, options: PruneOptions) -> PruneReport:
    """Save the stage's adapter in full, prune it into `pruned_dir` on process 0, and give every process its report.

    Every process must call this (saving a sharded model gathers it); afterwards the caller loads `pruned_dir`
    onto a fresh base model for the next stage.
    """
    adapter, pruned_dir = Path(stage_dir, STAGE_ADAPTER_DIR), Path(pruned_dir)
    trainer.save_model(str(adapter))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        prune_saved_adapter(adapter, pruned_dir, options, overwrite=True)
    trainer.accelerator.wait_for_everyone()
    return PruneReport.read(pruned_dir / PRUNE_REPORT_FILE)
