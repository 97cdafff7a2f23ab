"""LoRPA: Lottery Rank-Pruning Adaptation on top of peft LoRA."""

import logging

# peft imports bitsandbytes when it is installed; on CPUs with AVX-512 BF16 its import logs a warning that an
# optional hub kernel is missing, on every command, although its own fallback kernel runs. Keep its errors only.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

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
