"""A run's first checks, before it loads a model or reads data: an output folder that is never overwritten
by accident (records are written whole: `lorpa.checkpoints`), and Trainer values that would otherwise fail
minutes later, deep in the optimizer or data loader, as a traceback."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

# (flag, test a valid value passes, what the value must be); None stands for "not set" and is always valid.
TRAINER_VALUE_CHECKS = (
    ("learning_rate", lambda v: v > 0, "positive"),
    ("per_device_train_batch_size", lambda v: v >= 1, "a positive integer"),
    ("per_device_eval_batch_size", lambda v: v >= 1, "a positive integer"),
    ("gradient_accumulation_steps", lambda v: v >= 1, "a positive integer"),
    ("eval_accumulation_steps", lambda v: v >= 1, "a positive integer"),
    ("warmup_steps", lambda v: 0 <= v < 1 or float(v).is_integer(),
     "a fraction of the steps in [0, 1) or a whole number of steps"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("max_grad_norm", lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_epsilon", lambda v: v >= 0, ">= 0"),
    ("label_smoothing_factor", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("data_seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("dataloader_num_workers", lambda v: v >= 0, ">= 0"),
    ("save_total_limit", lambda v: v >= 0, ">= 0"),
    ("logging_steps", lambda v: v >= 0, ">= 0"),
    ("eval_steps", lambda v: v >= 0, ">= 0"),
    ("save_steps", lambda v: v >= 0, ">= 0"),
)


def check_run_arguments(training_args, method_args) -> None:
    """Every run script's first check, before it reads any data: an output folder is named and may be
    written, the budget trains something (a run that trains nothing would still replace an earlier
    results.json), and the Trainer's numeric flags are in range."""
    if not training_args.output_dir:
        raise InputError("--output_dir is required")
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise InputError("--num_train_epochs must be positive (or set --max_steps), "
                         f"got {training_args.num_train_epochs}")
    for flag, valid, requirement in TRAINER_VALUE_CHECKS:
        value = getattr(training_args, flag, None)
        if value is not None and not valid(value):
            raise InputError(f"--{flag} must be {requirement}, got {value}")
    check_output_dir(training_args.output_dir, overwrite=method_args.overwrite_output_dir,
                     resuming=training_args.resume_from_checkpoint is not None)


def refuse_labelled_tolerance(method_args) -> None:
    """For the run scripts that carve no selection split (run_clm.py, run_summarization.py): a labelled tolerance
    would have nothing held out to score on."""
    if method_args.tolerance_metric == "score":
        raise InputError("--tolerance_metric score chooses on a held-out selection split, which only run_glue.py "
                         "carves; here the tolerance is label-free (agreement or kl, on training rows), or search "
                         "with lorpa prune --tolerance T --evaluate COMMAND")


def check_output_dir(output_dir: str, *, overwrite: bool, resuming: bool) -> None:
    """Refuse a non-empty output folder unless the user asked to overwrite or resume it."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise InputError(f"output path {output_dir} exists and is not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"output folder {output_dir} cannot be written here (check the permissions of {existing})")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resuming):
        raise InputError(
            f"output folder {output_dir} is not empty; pass --overwrite_output_dir or --resume_from_checkpoint"
        )
