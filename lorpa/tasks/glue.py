"""GLUE data: hub or local files in the HF `glue` column schema, checked, tokenised and cached."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from datasets import DatasetDict, load_dataset

from ..errors import InputError
from .data_files import check_sample_limits, raw_values, read_data_file, require_columns
from .metrics import GLUE_TASKS, GlueTask, glue_metrics


@dataclass
class GlueDataArguments:
    _argument_group_name: ClassVar[str] = "data (GLUE)"
    task_name: str = field(metadata={"help": f"One of {', '.join(GLUE_TASKS)}"})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of local copies in the hub's schema, read instead of the hub: "
            "DATA_DIR/glue/<task>/train.jsonl and <validation split>.jsonl "
            "(MNLI: validation_matched, validation_mismatched)"
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "Local CSV/TSV/JSON Lines file instead of the hub"})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file (MNLI: matched)"})
    validation_mismatched_file: str | None = field(default=None, metadata={"help": "MNLI mismatched validation file"})
    test_file: str | None = field(default=None, metadata={"help": "Local file to predict after training"})
    max_seq_length: int = field(default=128, metadata={"help": "Sequences are truncated to this many tokens"})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every batch to max_seq_length instead of its longest sequence"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows"})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N rows of each eval split"}
    )
    max_predict_samples: int | None = field(default=None, metadata={"help": "Predict only the first N test rows"})
    selection_split_percentage: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this percentage of the training rows (seeded) as a selection split: the epoch is "
            "chosen on it, and results.json reports the validation score at that epoch as selected_metrics"
        },
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenising"})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenise instead of using the cache"})

    def __post_init__(self):
        if self.task_name not in GLUE_TASKS:
            raise InputError(f"unknown task {self.task_name!r}; choose one of {', '.join(GLUE_TASKS)}")
        if self.max_seq_length < 1:
            raise InputError(f"--max_seq_length must be positive, got {self.max_seq_length}")
        check_sample_limits(self)
        if self.selection_split_percentage is not None and not 0 < self.selection_split_percentage < 100:
            raise InputError("--selection_split_percentage must be in (0, 100), "
                             f"got {self.selection_split_percentage}")
        if self.data_dir is not None and not self.train_file:
            self._use_data_dir()
        local = (self.train_file, self.validation_file)
        if any(local) and not all(local):
            raise InputError("local data needs both --train_file and --validation_file")
        if self.task_name == "mnli" and self.train_file and not self.validation_mismatched_file:
            raise InputError("local MNLI data needs --validation_mismatched_file as well")

    def _use_data_dir(self) -> None:
        folder = Path(self.data_dir, "glue", self.task_name)
        if not folder.is_dir():
            raise InputError(f"--data_dir {self.data_dir}: no folder {folder} (expected glue/<task>/train.jsonl etc.)")
        eval_splits = GLUE_TASKS[self.task_name].eval_splits
        self.train_file = str(folder / "train.jsonl")
        self.validation_file = str(folder / f"{eval_splits[0]}.jsonl")
        if len(eval_splits) > 1:
            self.validation_mismatched_file = str(folder / f"{eval_splits[1]}.jsonl")

    @property
    def task(self) -> GlueTask:
        return GLUE_TASKS[self.task_name]


def _local_files(args: GlueDataArguments) -> dict[str, str]:
    eval_files = (args.validation_file, args.validation_mismatched_file)
    files = {"train": args.train_file, **dict(zip(args.task.eval_splits, eval_files))}
    if args.test_file:
        files["test"] = args.test_file
    return files


def _file_flags(args: GlueDataArguments) -> dict[str, str]:
    """The flag that named each local file, for the error when one is missing."""
    if args.data_dir is not None:
        return (dict.fromkeys(("train", *args.task.eval_splits, "test"), f"--data_dir {args.data_dir}")
                | {"test": "--test_file"})
    eval_flags = ("--validation_file", "--validation_mismatched_file")
    return {"train": "--train_file", **dict(zip(args.task.eval_splits, eval_flags)), "test": "--test_file"}


def _is_class_id(value) -> bool:
    """An integer as written in the file: JSON 1 (not 1.0 or true), CSV "1"."""
    if isinstance(value, str):
        return re.fullmatch(r"\s*-?\d+\s*", value) is not None
    return isinstance(value, int) and not isinstance(value, bool)


def check_labels(dataset, task: GlueTask, path: str) -> None:
    """Classification labels must be class ids of the task; STS-B scores must lie in [0, 5]."""
    labels = dataset["label"]
    if not task.is_regression and Path(path).is_file() and any(isinstance(label, float) for label in labels):
        # One non-integer value made the whole column float: name the row that has it, not row 1.
        row, label = next(((i, v) for i, v in enumerate(raw_values(path, "label")) if not _is_class_id(v)),
                          (0, labels[0]))
        raise InputError(f"{path}: row {row + 1} has label {label!r}; {task.name} expects a class id in "
                         f"0..{task.num_labels - 1}")
    for row, label in enumerate(labels):
        if task.is_regression:
            valid = isinstance(label, (int, float)) and 0 <= label <= 5
            expected = "a score in [0, 5]"
        else:
            valid = isinstance(label, int) and 0 <= label < task.num_labels
            expected = f"a class id in 0..{task.num_labels - 1}"
        if not valid:
            raise InputError(f"{path}: row {row + 1} has label {label!r}; {task.name} expects {expected}")


def load_glue(args: GlueDataArguments, cache_dir: str | None = None) -> DatasetDict:
    """Train and evaluation splits (and `test` if given), every row checked against the task schema."""
    task = args.task
    if args.train_file:
        files, flags = _local_files(args), _file_flags(args)
        splits = DatasetDict({split: read_data_file(path, cache_dir, flags[split]) for split, path in files.items()})
    else:
        files = {split: f"glue/{task.name} ({split})" for split in ("train", *task.eval_splits)}
        try:
            splits = load_dataset("nyu-mll/glue", task.name, cache_dir=cache_dir)
        except Exception as error:  # offline, hub errors: several exception types
            raise InputError(
                f"could not load dataset glue/{task.name}: {str(error).strip().splitlines()[0]}"
            ) from error
        splits = DatasetDict({split: splits[split] for split in files})
    for split, dataset in splits.items():
        if split == "test":  # GLUE test sets carry label -1: they are predicted, never scored
            require_columns(dataset, task.text_columns, files[split])
            continue
        require_columns(dataset, (*task.text_columns, "label"), files[split])
        check_labels(dataset, task, files[split])
    limits = {"train": args.max_train_samples, "test": args.max_predict_samples}
    for split, dataset in splits.items():
        limit = limits.get(split, args.max_eval_samples)
        if limit is not None:
            splits[split] = dataset.select(range(min(limit, len(dataset))))
    return splits


SELECTION_SPLIT = "selection"


def carve_selection_split(splits: DatasetDict, percentage: float, seed: int) -> DatasetDict:
    """Move `percentage`% of the training rows (a seeded random choice, at least one) to a selection split."""
    train = splits["train"]
    size = max(1, round(len(train) * percentage / 100))
    if size >= len(train):
        raise InputError(f"--selection_split_percentage {percentage} leaves no training rows out of {len(train)}")
    parts = train.train_test_split(test_size=size, seed=seed, shuffle=True)
    return DatasetDict({**splits, "train": parts["train"], SELECTION_SPLIT: parts["test"]})


def warn_if_too_coarse(rows: int, task: GlueTask, tolerance: float | None) -> None:
    """One selection row moves accuracy by 100/rows points: a tolerance below that cannot be resolved."""
    step = 100 / max(rows, 1)
    if tolerance is not None and task.main_metric == "accuracy" and step > tolerance:
        print(f"warning: the selection split has {rows} rows, so one row moves accuracy by {step:.2f} points, more "
              f"than --prune_tolerance {tolerance:g}: candidates within it cannot be told apart (raise "
              f"--selection_split_percentage)", file=sys.stderr)


def without_split_prefix(history: list[dict], split: str) -> list[dict]:
    """Evaluating several sets prefixes every metric with its set; give the validation set's metrics
    their plain names again (accuracy, not validation_accuracy), as runs without a selection split have."""
    prefix = f"{split}_"
    return [{(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in entry.items()} for entry in history]


def tokenize_glue(splits: DatasetDict, tokenizer, args: GlueDataArguments) -> DatasetDict:
    """Tokenise every split (cached by `datasets`), keeping only model inputs and `label`."""
    task = args.task

    def encode(batch):
        texts = [batch[column] for column in task.text_columns]
        return tokenizer(
            *texts,
            truncation=True,
            max_length=args.max_seq_length,
            padding="max_length" if args.pad_to_max_length else False,
        )

    return DatasetDict(
        {
            split: dataset.map(
                encode,
                batched=True,
                num_proc=args.preprocessing_num_workers,
                remove_columns=[c for c in dataset.column_names if c != "label"],
                load_from_cache_file=not args.overwrite_cache,
                desc=f"Tokenizing {split}",
            )
            for split, dataset in splits.items()
        }
    )


def compute_metrics_for(task: GlueTask):
    """A Trainer `compute_metrics` for the task."""

    def compute_metrics(eval_prediction):
        return glue_metrics(task.name, eval_prediction.predictions, eval_prediction.label_ids)

    return compute_metrics


def main_metric_name(task: GlueTask) -> str:
    """The key the Trainer logs the task's main metric under (MNLI: the matched split)."""
    if len(task.eval_splits) > 1:
        return f"{task.eval_splits[0]}_{task.main_metric}"
    return task.main_metric
