"""Output folders that are never overwritten by accident (records are written whole: `lorpa.checkpoints`)."""

from __future__ import annotations

from pathlib import Path

from ..cli import UsageError


def check_run_arguments(training_args, method_args) -> None:
    """Every run script's first check, before it reads any data: an output folder is named and may be
    written, and the budget trains something (a run that trains nothing would still replace an
    earlier results.json)."""
    if not training_args.output_dir:
        raise UsageError("--output_dir is required")
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise UsageError(f"--num_train_epochs must be positive (or set --max_steps), got {training_args.num_train_epochs}")
    check_output_dir(training_args.output_dir, overwrite=method_args.overwrite_output_dir,
                     resuming=training_args.resume_from_checkpoint is not None)


def check_output_dir(output_dir: str, *, overwrite: bool, resuming: bool) -> None:
    """Refuse a non-empty output folder unless the user asked to overwrite or resume it."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output path {output_dir} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resuming):
        raise UsageError(
            f"output folder {output_dir} is not empty; pass --overwrite_output_dir or --resume_from_checkpoint"
        )
