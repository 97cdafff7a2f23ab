"""Flags of `run_clm.py` beyond the shared model, method and data ones: the base model's dtype, QLoRA, merging."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import InputError

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_TYPES = ("nf4", "fp4")


@dataclass
class ClmModelArguments:
    torch_dtype: str = field(
        default="auto",
        metadata={"help": f"dtype the base model is loaded in, one of {', '.join(DTYPES)} (auto: the checkpoint's); "
                          "LoRA weights stay float32 (peft's autocast_adapter_dtype)"},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: load the base model in 4 bits with bitsandbytes (pip install 'lorpa[qlora]'); "
                          "LoRA trains on top in float32"},
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base model in 8 bits with bitsandbytes"})
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": f"4-bit data type, one of {', '.join(QUANT_TYPES)} (the QLoRA paper: nf4)"}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True,
        metadata={"help": "Quantise the 4-bit quantisation constants too (the QLoRA paper's double quantisation)"},
    )
    bnb_4bit_compute_dtype: str = field(
        default="bfloat16", metadata={"help": "dtype the 4-bit layers compute in (the QLoRA paper: bfloat16)"}
    )

    def __post_init__(self):
        if self.torch_dtype not in DTYPES:
            raise InputError(f"unknown --torch_dtype {self.torch_dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.load_in_4bit and self.load_in_8bit:
            raise InputError("give --load_in_4bit or --load_in_8bit, not both")
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise InputError(f"unknown --bnb_4bit_quant_type {self.bnb_4bit_quant_type!r}; "
                             f"choose one of {', '.join(QUANT_TYPES)}")
        if self.bnb_4bit_compute_dtype not in DTYPES or self.bnb_4bit_compute_dtype == "auto":
            raise InputError(f"unknown --bnb_4bit_compute_dtype {self.bnb_4bit_compute_dtype!r}; "
                             "choose one of float32, bfloat16, float16")

    @property
    def dtype(self):
        return DTYPES[self.torch_dtype]

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    def quantization_config(self):
        """transformers' BitsAndBytesConfig for the flags, or None; a missing bitsandbytes is one line naming
        the extra."""
        if not self.quantized:
            return None
        try:
            import bitsandbytes  # noqa: F401  (transformers needs it to quantise)
        except ImportError:
            raise InputError("--load_in_4bit / --load_in_8bit need bitsandbytes: pip install 'lorpa[qlora]'") from None
        from transformers import BitsAndBytesConfig

        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
                                  bnb_4bit_compute_dtype=DTYPES[self.bnb_4bit_compute_dtype])
