"""Loading pretrained models and tokenizers, from the hub or a local folder."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InputError


def _could_be_hub_id(name: str) -> bool:
    """Hub ids are `name` or `namespace/name`; a path like `runs/x/model` or `/abs/path` can only be a folder."""
    return not Path(name).is_absolute() and not name.startswith((".", "~")) and name.count("/") <= 1


def load_pretrained(loader, name_or_path: str, cache_dir: str | None = None, **kwargs):
    """`loader.from_pretrained`, with a missing or unreachable model reported as one line."""
    try:
        return loader.from_pretrained(name_or_path, cache_dir=cache_dir, **kwargs)
    except OSError as error:
        reason = str(error).strip().splitlines()[0]
        if Path(name_or_path).exists():
            raise InputError(f"could not load {name_or_path}: {reason}") from error
        if not _could_be_hub_id(name_or_path):
            raise InputError(
                f"could not load {name_or_path}: no such folder (and it cannot be a hub model id)"
            ) from error
        raise InputError(
            f"could not load {name_or_path}: no such folder, and the hub does not know it or cannot be reached "
            f"({reason})"
        ) from error


class _WithoutLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _keys(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_model(loader, name_or_path: str, cache_dir: str | None = None, **kwargs):
    """`load_pretrained` for a model, with transformers' multi-line load report (printed for every new
    task head) replaced by one line per kind of difference from the checkpoint."""
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _WithoutLoadReport()
    logger.addFilter(quiet)
    try:
        model, info = load_pretrained(loader, name_or_path, cache_dir, output_loading_info=True, **kwargs)
    finally:
        logger.removeFilter(quiet)
    for kind, note in (("missing_keys", "new, trained from scratch"),
                       ("mismatched_keys", "re-initialised, shape differs"),
                       ("unexpected_keys", "in the checkpoint but unused")):
        if info.get(kind):
            keys = [key[0] if isinstance(key, tuple) else key for key in info[kind]]
            print(f"weights {note}: {_keys(keys)}", flush=True)
    return model
