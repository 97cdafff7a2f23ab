"""Output folders that are never half-written and never overwritten by accident."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .cli import UsageError


def check_output_dir(output_dir: str, *, overwrite: bool, resuming: bool) -> None:
    """Refuse a non-empty output folder unless the user asked to overwrite or resume it."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output path {output_dir} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resuming):
        raise UsageError(
            f"output folder {output_dir} is not empty; pass --overwrite_output_dir or --resume_from_checkpoint"
        )


def write_json_atomic(path: str | Path, data) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=2, sort_keys=False, default=str)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
