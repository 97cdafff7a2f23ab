"""LoRPA: Lottery Rank-Pruning Adaptation on top of peft LoRA."""

from .layers import lora_layers
from .pruning import ModulePruning, PruneReport, check_prune_arguments, prune
from .rewind import get_peft_model, init_state_dict, load_init_state_dict, record_init
from .scoring import rank_scores
from .sensitivity import SensitivityCallback, update_sensitivity

__all__ = [
    "ModulePruning",
    "PruneReport",
    "check_prune_arguments",
    "get_peft_model",
    "init_state_dict",
    "load_init_state_dict",
    "lora_layers",
    "prune",
    "rank_scores",
    "record_init",
    "SensitivityCallback",
    "update_sensitivity",
]
