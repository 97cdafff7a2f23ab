"""Flags of `run_clm.py` beyond the shared model, method and data ones."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...cli import UsageError

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ClmModelArguments:
    torch_dtype: str = field(
        default="auto",
        metadata={"help": f"dtype the base model is loaded in, one of {', '.join(DTYPES)} (auto: the checkpoint's); "
                          "LoRA weights stay float32 (peft's autocast_adapter_dtype)"},
    )
    merge_final: bool = field(
        default=False,
        metadata={"help": "Also write the final model with the adapter merged into the weights to OUTPUT_DIR/merged, "
                          "for serving engines without (per-module rank) adapter support"},
    )

    def __post_init__(self):
        if self.torch_dtype not in DTYPES:
            raise UsageError(f"unknown --torch_dtype {self.torch_dtype!r}; choose one of {', '.join(DTYPES)}")

    @property
    def dtype(self):
        return DTYPES[self.torch_dtype]
