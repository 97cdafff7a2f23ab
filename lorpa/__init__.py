"""LoRPA: Lottery Rank-Pruning Adaptation on top of peft LoRA.

    report = lorpa.prune(model, lorpa.PruneOptions(target_rank=8, score="svd"))

Every name below is imported on first use, so `import lorpa` (and every command's `--help`) costs nothing until
torch, peft or transformers is needed.
"""

import importlib
import logging

# peft imports bitsandbytes when it is installed, and on CPUs with AVX-512 BF16 bitsandbytes looks for an optional hub
# kernel through `kernels`: both log a warning on every command (the kernel is missing, or its publisher cannot be
# checked offline) although bitsandbytes' own fallback kernel runs. Those lines would stand ahead of every one-line
# error a command prints, so keep these loggers' errors only.
for _logger in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_logger).setLevel(logging.ERROR)

_PUBLIC = {
    "InputError": "errors",
    "PruneOptions": "options",
    "PruneReport": "plan",
    "ModulePruning": "plan",
    "prune": "pruning",
    "prune_to_tolerance": "pruning",
    "rank_scores": "pruning",
    "prune_saved_adapter": "prune_adapter",
    "inspect_adapter": "inspect",
    "check_adapter": "check_adapter",
    "calibrate": "calibration",
    "get_peft_model": "rewind",
    "SensitivityCallback": "sensitivity",
    "update_sensitivity": "sensitivity",
    "StageOptions": "two_stage",
    "StageCallback": "two_stage",
    "TwoStageResult": "two_stage",
    "train_two_stage": "two_stage",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'lorpa' has no attribute {name!r}")


def __dir__():
    return __all__
