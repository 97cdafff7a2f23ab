"""LoRPA: Lottery Rank-Pruning Adaptation on top of peft LoRA."""

import logging

# peft imports bitsandbytes when it is installed, and on CPUs with AVX-512 BF16 bitsandbytes looks for an optional hub
# kernel through `kernels`: both log a warning on every command (the kernel is missing, or its publisher cannot be
# checked offline) although bitsandbytes' own fallback kernel runs. Those lines would stand ahead of every one-line
# error a command prints, so keep these loggers' errors only.
for _logger in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_logger).setLevel(logging.ERROR)

from .calibration import calibrate
from .layers import lora_layers
from .pruning import ModulePruning, PruneReport, check_prune_arguments, prune
from .rewind import get_peft_model, init_state_dict, load_init_state_dict, record_init
from .scoring import rank_scores
from .sensitivity import SensitivityCallback, update_sensitivity
from .tolerance import prune_to_tolerance

_TRAINER_API = ("TwoStageResult", "train_two_stage")  # imported on first use: they pull in transformers.Trainer

__all__ = [
    "ModulePruning",
    "PruneReport",
    "TwoStageResult",
    "calibrate",
    "check_prune_arguments",
    "get_peft_model",
    "init_state_dict",
    "load_init_state_dict",
    "lora_layers",
    "prune",
    "prune_to_tolerance",
    "rank_scores",
    "record_init",
    "SensitivityCallback",
    "update_sensitivity",
    "train_two_stage",
]


def __getattr__(name):
    if name in _TRAINER_API:
        from . import two_stage

        return getattr(two_stage, name)
    raise AttributeError(f"module 'lorpa' has no attribute {name!r}")
