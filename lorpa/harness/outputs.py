"""Output folders that are never half-written and never overwritten by accident."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from ..cli import UsageError


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
