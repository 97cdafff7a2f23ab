"""Putting the method's adapters on a transformers model.

The task head is always trained and saved: peft's `task_type` puts it in `modules_to_save`
(the authors' code passed no task type, so its classifier stayed at its random init).
"""

from __future__ import annotations

import peft
from peft import AdaLoraConfig, LoraConfig
from peft.utils import (
    TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)
from transformers import TrainerCallback

from .arguments import MethodArguments
from .cli import UsageError
from . import rewind


def target_modules(args: MethodArguments) -> list[str] | str | None:
    """peft takes its `all-linear` shorthand only as a plain string, never inside a list."""
    targets = args.lora_target_modules
    if targets and len(targets) == 1 and targets[0].lower() == "all-linear":
        return "all-linear"
    return targets


def lora_config(args: MethodArguments, task_type: str) -> LoraConfig:
    return LoraConfig(
        task_type=task_type,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules(args),
        modules_to_save=args.modules_to_save,
    )


def adalora_config(args: MethodArguments, task_type: str, total_steps: int) -> AdaLoraConfig:
    return AdaLoraConfig(
        task_type=task_type,
        init_r=args.lora_r,
        target_r=args.adalora_target_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules(args),
        modules_to_save=args.modules_to_save,
        total_step=total_steps,
        tinit=int(args.adalora_tinit_ratio * total_steps),
        tfinal=int(args.adalora_tfinal_ratio * total_steps),
    )


def check_target_modules(model_type: str, args: MethodArguments) -> None:
    """peft knows default target modules only for some model types; for the others they must be named."""
    if args.method == "full" or args.lora_target_modules:
        return
    if args.method == "adalora":
        defaults = TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING
    else:
        defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    if model_type not in defaults:
        raise UsageError(
            f"peft has no default target modules for model type {model_type!r}; pass --lora_target_modules"
        )


def attach_adapters(model, args: MethodArguments, task_type: str, total_steps: int):
    """The model to train: the bare model for `full`, else a PeftModel.

    Injection-time values are copied only when `--rewind init` will need them.
    """
    if args.method == "full":
        return model
    if args.method == "adalora":
        return peft.get_peft_model(model, adalora_config(args, task_type, total_steps))
    if args.method == "lorpa" and args.rewind == "init":
        return rewind.get_peft_model(model, lora_config(args, task_type))
    return peft.get_peft_model(model, lora_config(args, task_type))


class AdaLoraAllocationCallback(TrainerCallback):
    """Calls AdaLoRA's `update_and_allocate` after every optimizer step, while gradients still exist.

    Without it AdaLoRA under a plain Trainer never reallocates and silently trains as LoRA.
    """

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)
