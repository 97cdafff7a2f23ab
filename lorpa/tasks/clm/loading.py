"""The base model of `run_clm.py`: as stored or in --torch_dtype, or quantised for QLoRA."""

from __future__ import annotations

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from ...harness.loading import load_pretrained


def load_causal_lm(model_path: str, cache_dir: str | None, clm_args, training_args):
    """With --load_in_4bit / --load_in_8bit, bitsandbytes quantises the weights as they load onto this process's
    device, and peft's `prepare_model_for_kbit_training` readies the model as peft asks for k-bit training (the
    layers it does not quantise in float32, input gradients on for gradient checkpointing)."""
    quantization = clm_args.quantization_config()
    if quantization is None:
        return load_pretrained(AutoModelForCausalLM, model_path, cache_dir, dtype=clm_args.dtype)
    on_gpu = torch.cuda.is_available() and not training_args.use_cpu
    device = f"cuda:{training_args.local_process_index}" if on_gpu else "cpu"
    model = load_pretrained(AutoModelForCausalLM, model_path, cache_dir, dtype=clm_args.dtype,
                            quantization_config=quantization, device_map={"": device})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.gradient_checkpointing)
