"""A merged copy of a fine-tuned model, for serving engines that take no adapters or no per-module ranks."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from ...layers import unwrap

MERGED_DIR = "merged"


def save_merged(model, folder: str | Path, tokenizer=None) -> Path:
    """Merge the adapter into the base weights (peft's `merge_and_unload`) and save a plain transformers model.

    Changes `model` in place: call it after training. The folder loads with `from_pretrained` alone.
    """
    model = unwrap(model)
    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    merged.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return Path(folder)
