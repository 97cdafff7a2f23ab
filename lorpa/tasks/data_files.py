"""Reading local data files (CSV, TSV, JSON Lines) through `datasets`, with row-level checks.

`datasets` caches what it reads, so tokenisation (`Dataset.map`) is cached between runs too. Every
problem is reported as one line that names the file, and the row where there is one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from datasets import Dataset, load_dataset

from ..errors import InputError

FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}


def check_sample_limits(args) -> None:
    """--max_train_samples and friends select the first N rows: N must be at least 1."""
    for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InputError(f"--{name} must be a positive number of rows, got {value}")


def read_data_file(path: str, cache_dir: str | None = None, flag: str | None = None) -> Dataset:
    """`flag` is what named the file (e.g. `--train_file`, `--data_dir DIR`): a missing file is reported with it."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"data file not found: {path}" + (f" (given by {flag}; fix or change it)" if flag else ""))
    builder = FORMATS.get(file.suffix.lower())
    if builder is None:
        raise InputError(f"{path}: unsupported file type {file.suffix!r}; use one of {', '.join(FORMATS)}")
    if file.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if file.suffix.lower() == ".tsv" else {}
    try:
        dataset = load_dataset(builder, data_files=str(file.resolve()), split="train", cache_dir=cache_dir, **options)
    except Exception as error:  # datasets wraps parser errors in several exception types
        cause = error.__cause__ or error
        raise InputError(f"{path}: could not be parsed as {builder}: {str(cause).strip().splitlines()[0]}") from error
    if len(dataset) == 0:
        raise InputError(f"{path}: file has no rows")
    return dataset


def require_columns(dataset: Dataset, columns, path: str) -> None:
    """Every column present, and no row with a missing (null) value in it."""
    for column in columns:
        if column not in dataset.column_names:
            raise InputError(f"{path}: no column {column!r} (columns: {', '.join(dataset.column_names)})")
        values = dataset[column]
        missing = next((row for row, value in enumerate(values) if value is None), None)
        if missing is not None:
            raise InputError(f"{path}: row {missing + 1} has no value for {column!r}")


def raw_values(path: str, column: str):
    """The column's values as written in a local file, row by row (JSON values; CSV/TSV strings).

    `datasets` gives a column one type, so a single `1.0` among integer labels turns every label into a
    float; the raw values tell which row did it.
    """
    file = Path(path)
    with file.open(newline="") as stream:
        if FORMATS.get(file.suffix.lower()) == "json":
            for line in stream:
                if line.strip():
                    yield json.loads(line).get(column)
        else:
            delimiter = "\t" if file.suffix.lower() == ".tsv" else ","
            quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
            for row in csv.DictReader(stream, delimiter=delimiter, quoting=quoting):
                yield row.get(column)
