"""Loading pretrained models and tokenizers, from the hub or a local folder."""

from __future__ import annotations

from .cli import UsageError


def load_pretrained(loader, name_or_path: str, cache_dir: str | None = None, **kwargs):
    """`loader.from_pretrained`, with a missing or unreachable model reported as one line."""
    try:
        return loader.from_pretrained(name_or_path, cache_dir=cache_dir, **kwargs)
    except OSError as error:
        raise UsageError(f"could not load {name_or_path}: {str(error).strip().splitlines()[0]}") from error
