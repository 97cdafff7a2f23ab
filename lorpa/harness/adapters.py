"""Putting the method's adapters on a transformers model.

The task head is always trained and saved: peft's `task_type` puts it in `modules_to_save`
(the authors' code passed no task type, so its classifier stayed at its random init).
"""

from __future__ import annotations

import warnings

import peft
from peft import AdaLoraConfig, LoraConfig
from peft.utils import (
    TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)
from torch import nn
from transformers import TrainerCallback
from transformers.pytorch_utils import Conv1D

from .. import rewind
from ..errors import InputError
from .arguments import MethodArguments


def target_modules(args: MethodArguments) -> list[str] | str | None:
    """peft takes its `all-linear` shorthand only as a plain string, never inside a list."""
    targets = args.lora_target_modules
    if targets and len(targets) == 1 and targets[0].lower() == "all-linear":
        return "all-linear"
    return _copy(targets)


def lora_config(args: MethodArguments, task_type: str) -> LoraConfig:
    return LoraConfig(
        task_type=task_type,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules(args),
        modules_to_save=_copy(args.modules_to_save),
    )


def _copy(names: list[str] | None) -> list[str] | None:
    """peft appends the task head to `modules_to_save` in place; the user's list (in results.json) stays as given."""
    return None if names is None else list(names)


def adalora_config(args: MethodArguments, task_type: str, total_steps: int) -> AdaLoraConfig:
    return AdaLoraConfig(
        task_type=task_type,
        init_r=args.lora_r,
        target_r=args.adalora_target_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules(args),
        modules_to_save=_copy(args.modules_to_save),
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
        raise InputError(
            f"peft has no default target modules for model type {model_type!r}; pass --lora_target_modules"
        )


def _matches(module_name: str, key: str) -> bool:
    """peft's rule for a name in a list of target modules: the whole name, or its last dotted parts."""
    return module_name == key or module_name.endswith("." + key)


def _names_hint(names, limit: int = 12) -> str:
    """Distinct last name parts, outermost modules first (`pooler` before `LayerNorm`)."""
    short = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in sorted(names, key=lambda n: (n.count("."), n))))
    short = [n for n in short if not n.isdigit()]
    return ", ".join(short[:limit]) + (", ..." if len(short) > limit else "")


def check_module_names(model, args: MethodArguments) -> None:
    """Every name in --lora_target_modules / --modules_to_save must match a module of the model.

    peft fails with a traceback when no target matches and silently ignores a target that matches
    nothing while another does; a misspelt module name would otherwise train a different adapter.
    """
    names = [name for name, _ in model.named_modules() if name]
    linear = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))]
    targets = target_modules(args)
    for flag, keys, hint in (
        ("--lora_target_modules", [] if targets == "all-linear" else targets,
         f"the model's linear layers: {_names_hint(linear)}"),
        ("--modules_to_save", args.modules_to_save, f"the model's modules include {_names_hint(names)}"),
    ):
        for key in keys or ():
            if not any(_matches(name, key) for name in names):
                raise InputError(f"{flag} {key}: no module of the model has that name; {hint}")


def attach_adapters(model, args: MethodArguments, task_type: str, total_steps: int):
    """The model to train: the bare model for `full`, else a PeftModel.

    Injection-time values are copied only when `--rewind init` will need them.
    """
    if args.method == "full":
        return model
    check_module_names(model, args)
    # peft calls a transformers method deprecated in favour of another; not ours to fix
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
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
